import os
import sys
import types

import pytest

from helpers import storage


def test_atomic_write_replaces(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    storage.atomic_write(p, "one")
    storage.atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    assert os.listdir(p.parent) == ["a.txt"]


def test_interrupted_write_leaves_old_file_whole_and_no_temp(tmp_path):
    p = tmp_path / "ckpt.bin"
    storage.atomic_write(p, b"old contents")
    with pytest.raises(RuntimeError, match="crash"):
        with storage.atomic_open(p) as f:
            f.write(b"half of the new")
            raise RuntimeError("crash mid-write")
    assert p.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["ckpt.bin"]


def test_interrupted_first_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with storage.atomic_open(tmp_path / "new.txt", "w") as f:
            f.write("x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_atomic_open_refuses_append(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', not 'a'"):
        with storage.atomic_open(tmp_path / "x", "a"):
            pass


def test_local_fallback_and_layout(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.ENV_HOME, str(tmp_path / "home"))
    root = storage.mount_drive()
    assert root == tmp_path / "home"
    paths = storage.project_paths()
    assert [p.name for p in (paths.outputs, paths.datasets, paths.models, paths.runs)] == \
        ["outputs", "datasets", "models", "runs"]
    assert all(p.is_dir() for p in (paths.outputs, paths.datasets, paths.models, paths.runs))


def _fake_colab(monkeypatch, mount):
    google = types.ModuleType("google")
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mount)
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.delenv(storage.ENV_HOME, raising=False)


def test_colab_mounts_drive(tmp_path, monkeypatch):
    mounted = []
    _fake_colab(monkeypatch, lambda point: mounted.append(point))
    root = storage.mount_drive(tmp_path / "drive")
    assert mounted == [str(tmp_path / "drive")]
    assert root == tmp_path / "drive" / "MyDrive" / "llava-sd-notebooks" and (root / "outputs").is_dir()


def test_colab_mount_failure_falls_back_and_says_where(tmp_path, monkeypatch, capsys):
    def refuse(point):
        raise ValueError("mount failed")

    _fake_colab(monkeypatch, refuse)
    monkeypatch.setattr(storage, "COLAB_LOCAL_ROOT", tmp_path / "local")
    root = storage.mount_drive(tmp_path / "drive")
    assert root == tmp_path / "local" and (root / "runs").is_dir()
    out = capsys.readouterr().out
    assert "Drive could not be mounted (ValueError: mount failed)" in out and str(tmp_path / "local") in out


def test_next_free_path_never_overwrites(tmp_path):
    first = storage.next_free_path(tmp_path, ".png", "42")
    assert first.name == "00000-42.png"
    first.write_bytes(b"x")
    (tmp_path / "00007-1.png").write_bytes(b"x")
    assert storage.next_free_path(tmp_path, ".png", "43").name == "00008-43.png"


def test_a_rewritten_file_keeps_its_mode_and_a_new_one_gets_the_umasks(tmp_path):
    import stat

    shared = tmp_path / "caption.txt"
    shared.write_text("old")
    shared.chmod(0o664)
    storage.atomic_write(shared, "new")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o664 and shared.read_text() == "new"
    old = os.umask(0o022)
    try:
        fresh = storage.atomic_write(tmp_path / "fresh.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644   # not mkstemp's 0600


def test_an_image_made_while_the_project_folder_is_broken_is_saved_to_the_fallback(sd, tmp_path, monkeypatch, capsys):
    from helpers import diffusion

    broken = tmp_path / "home"
    broken.write_text("a file where the project folder should be")
    monkeypatch.setenv(storage.ENV_HOME, str(broken))
    monkeypatch.setattr(storage, "WRITE_RETRY_DELAYS_S", ())
    monkeypatch.setattr(storage, "LOCAL_FALLBACK", tmp_path / "local")
    result = diffusion.generate(sd, "a red square", num_inference_steps=2, width=64, height=64, seed=1, progress=False)
    [path] = result.save()
    assert path.is_file() and path.is_relative_to(tmp_path / "local") and "instead" in capsys.readouterr().out
