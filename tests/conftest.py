import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import settings

from helpers import storage

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
