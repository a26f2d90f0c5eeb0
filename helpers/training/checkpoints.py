"""Training checkpoints: written whole or not at all, retried when Drive hiccups, found again on resume.

`accelerator.save_state` writes the whole state (weights, optimizer, learning-rate schedule, RNG states of every
process) into a hidden staging folder of the run, which is renamed to `checkpoint-<step>` once complete, so a kill
during a save leaves the previous checkpoint whole; the last `keep` are kept. With several processes, save_state is
called on every rank (each writes its own RNG state) and only the main process renames and prunes, between barriers.
"""
import json
import re
import shutil
import time
from pathlib import Path

from .. import storage

RETRY_DELAYS_S = (2, 10)   # waits between tries of a checkpoint save that failed (Drive hiccups)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
SETTINGS_NAME = "settings.json"   # beside the state: the settings that shape the weights (see check_resumable)


def fallback_dir(run_dir) -> Path:
    """Where checkpoints go when the run folder (on Drive) cannot be written: the machine's own disk."""
    return storage.LOCAL_FALLBACK / "runs" / Path(run_dir).name


def checkpoints(run_dir) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run, oldest first, as (step, folder): in the run folder and in its local
    fallback (see fallback_dir)."""
    found = [(int(m.group(1)), p) for folder in (Path(run_dir), fallback_dir(run_dir))
             for p in folder.glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def _save_state(accelerator, folder: Path, step: int, settings: dict) -> Path:
    """save_state into a hidden folder, renamed to checkpoint-<step> once complete (by the main process)."""
    target, staging = folder / f"checkpoint-{step}", folder / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()  # every rank's RNG state is in, before the folder counts as complete
        if accelerator.is_main_process:
            (staging / SETTINGS_NAME).write_text(json.dumps(settings, indent=2))
            staging.rename(target)  # complete: only now does it count as a checkpoint
    except OSError:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return target


def save_checkpoint(accelerator, run_dir, step: int, keep: int, settings: dict | None = None) -> Path:
    """Save a checkpoint into the run folder, trying again after a failed write; where the run folder stays
    unwritable (Drive gone), into the local fallback, and say so. Only the last `keep` are kept. `settings` are
    written beside the state as settings.json (see check_resumable)."""
    settings = settings or {}
    run_dir = Path(run_dir)
    for delay in (*RETRY_DELAYS_S, None):
        try:
            target = _save_state(accelerator, run_dir, step, settings)
            break
        except OSError as e:
            if delay is None:
                target = _save_state(accelerator, fallback_dir(run_dir), step, settings)
                print(f"Could not write checkpoint {step} to {run_dir} ({e}). Saved it to {target} on this "
                      "machine's disk instead: it is lost if the session ends. When Drive works again, the next "
                      "checkpoint goes there; a resume finds either.")
                break
            print(f"Writing checkpoint {step} failed ({e}); trying again in {delay} s.")
            time.sleep(delay)
    if accelerator.is_main_process:
        for _, old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def check_resumable(checkpoint: Path, settings: dict) -> None:
    """Refuse to resume from `checkpoint` with settings that change the shape of what was trained (another base
    model, method, rank, ...): loading it would fail deep in torch, or train something else than asked."""
    path = Path(checkpoint) / SETTINGS_NAME
    if not path.is_file():   # a checkpoint from before settings.json: nothing to compare
        return
    saved = json.loads(path.read_text())
    changed = {k: (saved[k], v) for k, v in settings.items() if k in saved and saved[k] != v}
    if changed:
        listed = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
        raise ValueError(f"The run in {str(Path(checkpoint).parent)!r} was trained with {listed}, so it cannot resume "
                         "with these settings: use a new run folder (RUN_NAME), or the same settings.")
