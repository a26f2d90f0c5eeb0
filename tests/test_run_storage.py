"""A training run's files when storage fails for real (issue 17, items 2-4): a full disk (a small tmpfs), a file
system flipped read-only for a moment, the run folder deleted mid-run, and two runs that would share a fallback.
Each: training goes on or stops in one line, no finished checkpoint is lost or half-written, and no run resumes
another run's checkpoint. The mounts need root (CI runs as root)."""
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import storage
from helpers.training import checkpoints, loop
from conftest import draw_dataset

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return draw_dataset(tmp_path_factory.mktemp("data") / "5_sks cat", [(64, 64)] * 2, ["a photo of a cat"] * 2)


def config(dataset, run_dir, **kwargs):
    settings = dict(dataset=str(dataset), run_dir=str(run_dir), resolution=64, rank=4, alpha=4, learning_rate=1e-3,
                    max_train_steps=4, checkpoint_every=2, seed=0, trigger="sks")
    return loop.TrainConfig(**{**settings, **kwargs})


@pytest.fixture(autouse=True)
def fast_retries(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "WRITE_RETRY_DELAYS_S", (0, 0))
    monkeypatch.setattr(checkpoints, "RETRY_DELAYS_S", (0, 0))
    monkeypatch.setattr(storage, "LOCAL_FALLBACK", tmp_path / "local")


@pytest.fixture
def small_disk(tmp_path):
    """make(name): a real tmpfs of 8 MiB at tmp_path/name (unmounted at the end)."""
    mounted = []

    def make(name, size="8m"):
        folder = tmp_path / name
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system of `folder` to the last byte with a ballast file; returns it."""
    ballast = folder / "ballast"
    with ballast.open("wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass
    return ballast


def leftovers(*folders) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if p.name.endswith(".tmp")]


def whole(checkpoint: Path) -> bool:
    """Every safetensors file of the checkpoint loads."""
    files = list(checkpoint.glob("*.safetensors"))
    return bool(files) and all(load_file(str(f)) is not None for f in files)


@needs_root
def test_a_full_disk_sends_the_checkpoint_and_the_lora_to_local_disk_and_training_goes_on(dataset, small_disk,
                                                                                          capsys):
    run_dir = small_disk("drive") / "run"
    loop.train_lora(config(dataset, run_dir), stop_after=2, progress=False)
    fill(run_dir.parent)
    result = loop.train_lora(config(dataset, run_dir), progress=False)
    out = capsys.readouterr().out
    assert result.steps == 4 and result.resumed_from == 2
    assert "No space left on device" in out and "Saved it to" in out
    fallback = checkpoints.fallback_dir(run_dir)
    assert checkpoints.checkpoints(run_dir) == [(2, run_dir / "checkpoint-2"), (4, fallback / "checkpoint-4")]
    assert whole(run_dir / "checkpoint-2") and whole(fallback / "checkpoint-4")
    assert result.lora_path.is_file() and result.lora_path.is_relative_to(storage.LOCAL_FALLBACK)
    assert (result.lora_path.parent / "sks.safetensors").is_file()   # the A1111 file beside it
    assert leftovers(run_dir, storage.LOCAL_FALLBACK) == []


@needs_root
def test_when_both_disks_are_full_training_stops_in_one_line_and_resumes_once_there_is_space(dataset, small_disk,
                                                                                           monkeypatch, capsys):
    run_dir = small_disk("drive") / "run"
    local = small_disk("local")
    monkeypatch.setattr(storage, "LOCAL_FALLBACK", local / "fallback")
    loop.train_lora(config(dataset, run_dir), stop_after=2, progress=False)
    ballasts = [fill(run_dir.parent), fill(local)]
    with pytest.raises(storage.WriteFailed) as stop:
        loop.train_lora(config(dataset, run_dir), progress=False)
    message = str(stop.value)
    assert "\n" not in message and "checkpoint 4" in message and "No space left on device" in message
    assert "free of" in message and "TROUBLESHOOTING.md#disk-full" in message
    assert [s for s, _ in checkpoints.checkpoints(run_dir)] == [2] and whole(run_dir / "checkpoint-2")
    assert leftovers(run_dir, local) == []
    for ballast in ballasts:
        ballast.unlink()
    capsys.readouterr()
    again = loop.train_lora(config(dataset, run_dir), progress=False)
    assert again.resumed_from == 2 and again.steps == 4 and again.lora_path == run_dir / "lora" / \
        "pytorch_lora_weights.safetensors" and again.lora_path.is_file()


@needs_root
def test_a_file_system_flipped_read_only_for_a_moment_loses_no_loss_row(dataset, small_disk, monkeypatch, capsys):
    disk = small_disk("drive")
    run_dir = disk / "run"
    monkeypatch.setattr(storage, "WRITE_RETRY_DELAYS_S", (1, 1))
    real = loop.append_loss
    flips = []

    def append_loss(folder, step, value):
        if step == 3:   # Drive "hiccups": read-only for half a second, then back
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            flips.append(step)
            threading.Timer(0.5, subprocess.run, (["mount", "-o", "remount,rw", str(disk)],)).start()
        return real(folder, step, value)

    monkeypatch.setattr(loop, "append_loss", append_loss)
    result = loop.train_lora(config(dataset, run_dir), progress=False)
    assert flips == [3] and result.steps == 4
    rows = (run_dir / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert "Could not add" not in capsys.readouterr().out


def test_a_run_folder_deleted_mid_run_is_made_again_and_the_run_ends(dataset, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real = loop.save_checkpoint

    def save_then_delete(accelerator, folder, step, *args, **kwargs):
        saved = real(accelerator, folder, step, *args, **kwargs)
        if step == 2:
            shutil.rmtree(run_dir)
        return saved

    monkeypatch.setattr(loop, "save_checkpoint", save_then_delete)
    result = loop.train_lora(config(dataset, run_dir), progress=False)
    assert result.steps == 4 and result.lora_path == run_dir / "lora" / "pytorch_lora_weights.safetensors"
    assert result.lora_path.is_file() and [s for s, _ in checkpoints.checkpoints(run_dir)] == [4]
    assert (run_dir / checkpoints.RUN_ID_NAME).is_file()   # still the same run: a resume from checkpoint-4 works
    assert [r.split(",")[0] for r in (run_dir / "loss.csv").read_text().splitlines()[1:]] == ["3", "4"]


def _drive_down_for(monkeypatch, folder: Path):
    """Accelerator.save_state fails (as a dropped Drive does) for every path under `folder`."""
    from accelerate import Accelerator

    real = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        if str(output_dir).startswith(str(folder)):
            raise OSError(107, "Transport endpoint is not connected", output_dir)
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)


def test_a_run_of_the_same_name_in_another_folder_never_resumes_the_first_ones_fallback(dataset, tmp_path,
                                                                                       monkeypatch):
    first, second = tmp_path / "a" / "samename", tmp_path / "b" / "samename"
    _drive_down_for(monkeypatch, first)
    loop.train_lora(config(dataset, first), stop_after=2, progress=False)
    assert [p.parent for _, p in checkpoints.checkpoints(first)] == [checkpoints.fallback_dir(first)]
    assert checkpoints.fallback_dir(first) != checkpoints.fallback_dir(second)
    other = loop.train_lora(config(dataset, second), stop_after=2, progress=False)
    assert other.resumed_from is None


def test_a_run_deleted_to_start_over_does_not_resume_its_old_fallback_checkpoint(dataset, tmp_path, monkeypatch,
                                                                                capsys):
    run_dir = tmp_path / "drive" / "run"
    _drive_down_for(monkeypatch, run_dir)
    loop.train_lora(config(dataset, run_dir), stop_after=2, progress=False)
    old = checkpoints.fallback_dir(run_dir) / "checkpoint-2"
    assert old.is_dir()
    shutil.rmtree(run_dir)   # the user starts over
    capsys.readouterr()
    fresh = loop.train_lora(config(dataset, run_dir, rank=8), stop_after=2, progress=False)   # other settings too
    out = capsys.readouterr().out
    assert fresh.resumed_from is None and "Resuming" not in out
    assert "belong to another run of this folder" in out and old.is_dir()   # left where it is, not deleted


def test_a_trigger_that_is_a_path_or_invalid_on_windows_names_a_file_inside_the_run(dataset, tmp_path):
    result = loop.train_lora(config(dataset, tmp_path / "run", trigger="../../escape:<x>", max_train_steps=2),
                             progress=False)
    made = sorted(p.name for p in (tmp_path / "run" / "lora").iterdir())
    assert made == ["_.._escape__x_.safetensors", "pytorch_lora_weights.safetensors"]
    assert result.lora_path.parent == tmp_path / "run" / "lora"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]   # nothing outside the run folder


def test_asking_for_fewer_steps_than_a_run_has_done_is_refused_before_loading(dataset, tmp_path, monkeypatch):
    from helpers import loading

    loop.train_lora(config(dataset, tmp_path / "run"), progress=False)
    monkeypatch.setattr(loading, "load_sd", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="`max_train_steps` is 2, but the run in .* has already trained 4 steps"):
        loop.train_lora(config(dataset, tmp_path / "run", max_train_steps=2), progress=False)


def test_a_second_training_of_the_same_run_folder_is_refused_while_the_first_runs(dataset, tmp_path):
    import sys

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from helpers.training import loop; "
                               "lock = loop.run_lock(Path(sys.argv[1])); lock.__enter__(); print('held', flush=True); "
                               "time.sleep(120)", str(run_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"Another training is running in .* \\(process {holder.pid}\\)"):
            loop.train_lora(config(dataset, run_dir), progress=False)
        assert not list(run_dir.glob("checkpoint-*"))
    finally:
        holder.kill()
        holder.wait()
    result = loop.train_lora(config(dataset, run_dir, max_train_steps=2), progress=False)   # free once it ended
    assert result.steps == 2
