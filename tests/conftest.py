import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import settings

from helpers import loading, storage

# The property tests draw the same examples on every run ("ci"), so a CI result can be repeated and never flips on
# its own; HYPOTHESIS_PROFILE=explore draws new ones each run (and keeps failures in .hypothesis/) to hunt for bugs.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _fresh_storage_root(monkeypatch):
    """mount_drive() remembers its choice in the module; each test starts without one."""
    monkeypatch.setattr(storage, "_root", None)


def load_bench(name: str):
    """A script of bench/ as a module (they are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_pipe(name: str):
    pipe = loading.load_sd(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd():
    """The tiny SD 1.5 pipeline (SMOKE MODE), progress bars off: one a test module."""
    return _tiny_pipe("sd15")


@pytest.fixture(scope="module")
def sdxl():
    """The tiny SDXL pipeline (SMOKE MODE), progress bars off: one a test module."""
    return _tiny_pipe("sdxl")


def draw_dataset(folder: Path, sizes, captions=None) -> Path:
    """A kohya-style training folder: image i of random pixels (RandomState(i)) at sizes[i] (width, height), with
    captions[i] in its .txt where captions are given. `folder` is the repeat folder ("5_sks cat"); returns the
    dataset root above it."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray((np.random.RandomState(i).rand(h, w, 3) * 255).astype("uint8")).save(folder / f"{i}.png")
        if captions is not None:
            (folder / f"{i}.txt").write_text(captions[i])
    return folder.parent
