"""Training checkpoints: written whole or not at all, retried when Drive hiccups, found again on resume.

A run has an identity, a random id in `run_dir/.run-id` written when it starts; its local fallback is keyed by the
run folder's full path and that id, so a run deleted to start over, or another run of the same name, never resumes a
stranger's checkpoint.

`accelerator.save_state` writes the whole state (weights, optimizer, learning-rate schedule, RNG states of every
process; for a LoRA/DoRA run the adapter weights only, never the frozen base: see save_trained_only) into a hidden
staging folder of the run, which is renamed to `checkpoint-<step>` once complete, so a kill
during a save leaves the previous checkpoint whole; the last `keep` are kept. With several processes, save_state is
called on every rank (each writes its own RNG state) and only the main process renames and prunes, between barriers.
"""
import json
import re
import shutil
import time
import uuid
from pathlib import Path

from .. import storage

RETRY_DELAYS_S = (2, 10)   # waits between tries of a checkpoint save that failed (Drive hiccups)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
SETTINGS_NAME = "settings.json"   # beside the state: the settings that shape the weights (see check_resumable)
LOSSES_NAME = "losses.json"       # beside the state: the logged losses up to its step (the run's loss.csv may lag)
RUN_ID_NAME = ".run-id"
ADAPTER_NAME = "adapter_{}.safetensors"   # a LoRA run's trained weights, one file a prepared model (peft's state dict)


def fallback_dir(run_dir, ident: str | None = None) -> Path | None:
    """Where checkpoints go when the run folder (on Drive) cannot be written: the machine's own disk, keyed by the
    run folder's full path (storage.fallback_path) and the run's id (`ident`, else the one in the run folder; None
    before the run started)."""
    ident = ident or run_id(run_dir)
    return storage.fallback_path(run_dir) / f"run-{ident}" if ident else None


def run_id(run_dir) -> str | None:
    """The id of the run in `run_dir` (None before it first started, or after its folder was deleted)."""
    try:
        return (Path(run_dir) / RUN_ID_NAME).read_text().strip() or None
    except OSError:
        return None


def start_run(run_dir) -> str:
    """The run's id: the one its folder has, or a new one written there. Where the run folder cannot be written at
    all, a one-line storage.WriteFailed: a run must start where it can be found again."""
    found = run_id(run_dir)
    if found:
        return found
    new, path = uuid.uuid4().hex, Path(run_dir) / RUN_ID_NAME
    try:
        with storage.atomic_open(path, "w") as f:
            f.write(new + "\n")
    except OSError as e:
        raise storage.cannot_write("the run's id", path, e) from e
    return new


def save_trained_only(accelerator) -> None:
    """For a LoRA/DoRA run: save_state writes each prepared model's adapter weights (peft's state dict, a few MB) as
    adapter_<i>.safetensors instead of the whole model with its frozen base (GBs), and load_state reads them back,
    as diffusers' training examples do with the same accelerate hooks. A checkpoint of an earlier version (whole
    models, model.safetensors) still resumes: where it holds no adapter file, accelerate loads the whole models."""
    import safetensors.torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    def save(models, weights, output_dir):
        for i, model in enumerate(models):
            state = get_peft_model_state_dict(accelerator.unwrap_model(model))
            if accelerator.is_main_process:
                safetensors.torch.save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()},
                                            str(Path(output_dir) / ADAPTER_NAME.format(i)))
        weights.clear()   # nothing more for accelerate to write: the frozen base is never saved

    def load(models, input_dir):
        if not (Path(input_dir) / ADAPTER_NAME.format(0)).is_file():
            return   # an older checkpoint of whole models: accelerate loads them
        for i, model in enumerate(models):
            state = safetensors.torch.load_file(str(Path(input_dir) / ADAPTER_NAME.format(i)))
            result = set_peft_model_state_dict(accelerator.unwrap_model(model), state)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"{input_dir}: its adapter {i} does not fit this run's model (unexpected "
                                 f"{result.unexpected_keys[:3]}): resume with the run's own settings.")
        models.clear()   # loaded here: accelerate has none left to load

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def checkpoint_bytes(params, optimizer: str) -> int:
    """About the size of one checkpoint of a run whose trained parameters are `params`: the fp32 weights and the
    optimizer's two moments (fp32, or a byte each for 8-bit AdamW); RNG and scheduler states are a few KB."""
    n = sum(p.numel() for p in params)
    return n * 4 + n * (2 if "8bit" in str(optimizer) else 8)


def checkpoints(run_dir) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run, oldest first, as (step, folder): in the run folder and in its local
    fallback (see fallback_dir)."""
    folders = [Path(run_dir)] + [f for f in [fallback_dir(run_dir)] if f]
    return sorted((int(m.group(1)), p) for folder in folders for p in folder.glob("checkpoint-*")
                  if (m := _CHECKPOINT.match(p.name)))


def strangers(run_dir) -> list[Path]:
    """Checkpoints in the run folder's fallback that belong to another run of that folder (one deleted to start
    over): never resumed."""
    mine = fallback_dir(run_dir)
    return sorted(p for p in storage.fallback_path(run_dir).glob("run-*/checkpoint-*")
                  if p.parent != mine and _CHECKPOINT.match(p.name))


def _save_state(accelerator, folder: Path, step: int, settings: dict, losses: list[float], mark: bool) -> Path:
    """save_state into a hidden folder, renamed to checkpoint-<step> once complete (by the main process). `mark`:
    `folder` is the run folder, whose .run-id is written again where it was deleted mid-run."""
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
            (staging / LOSSES_NAME).write_text(json.dumps(losses))
            if mark and settings.get("run_id") and not (folder / RUN_ID_NAME).is_file():   # deleted and made
                (folder / RUN_ID_NAME).write_text(settings["run_id"] + "\n")             # again: still this run
            staging.rename(target)  # complete: only now does it count as a checkpoint
    except Exception:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return target


def save_checkpoint(accelerator, run_dir, step: int, keep: int, settings: dict | None = None,
                    losses: list[float] | None = None) -> Path:
    """Save a checkpoint into the run folder, trying again after a failed write (Drive gone, disk full: see
    storage.is_write_failure); where the run folder stays unwritable, into the local fallback, and say so; where
    that fails too, storage.WriteFailed in one line (the previous checkpoints are whole). Only the last `keep` are
    kept, once the new one is complete. `settings` are written beside the state as settings.json (see
    check_resumable), `losses` (those of steps 1..step) as losses.json."""
    settings, losses = settings or {}, list(losses or [])
    run_dir = Path(run_dir)
    for delay in (*RETRY_DELAYS_S, None):
        try:
            target = _save_state(accelerator, run_dir, step, settings, losses, mark=True)
            break
        except Exception as e:
            if not storage.is_write_failure(e):
                raise
            if delay is not None:
                print(f"Writing checkpoint {step} failed ({e}); trying again in {delay} s.")
                time.sleep(delay)
                continue
            fallback = fallback_dir(run_dir, settings.get("run_id")) or storage.fallback_path(run_dir) / "run-"
            try:
                target = _save_state(accelerator, fallback, step, settings, losses, mark=False)
            except Exception as again:
                if not storage.is_write_failure(again):
                    raise
                raise storage.cannot_write(f"checkpoint {step}", run_dir, e, fallback, again) from again
            print(f"Could not write checkpoint {step} to {run_dir} ({e}; {storage.free_space(run_dir)}). Saved it "
                  f"to {target} on this machine's disk instead: it is lost if the session ends. When Drive works "
                  "again, the next checkpoint goes there; a resume finds either.")
            break
    if accelerator.is_main_process:
        for _, old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def saved_losses(checkpoint: Path) -> list[float] | None:
    """The losses a checkpoint holds (None for one from before losses.json)."""
    try:
        return [float(v) for v in json.loads((Path(checkpoint) / LOSSES_NAME).read_text())]
    except (OSError, ValueError, TypeError):
        return None


def check_resumable(checkpoint: Path, settings: dict) -> None:
    """Refuse to resume from `checkpoint` with settings that change the shape of what was trained (another base
    model, method, rank, ...): loading it would fail deep in torch, or train something else than asked."""
    path = Path(checkpoint) / SETTINGS_NAME
    if not path.is_file():   # a checkpoint from before settings.json: nothing to compare
        return
    saved = json.loads(path.read_text())
    changed = {k: (saved[k], v) for k, v in settings.items() if k in saved and saved[k] != v and k != "run_id"}
    if changed:
        listed = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
        raise ValueError(f"The run in {str(Path(checkpoint).parent)!r} was trained with {listed}, so it cannot resume "
                         "with these settings: use a new run folder (RUN_NAME), or the same settings.")
