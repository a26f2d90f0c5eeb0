import importlib.util
from pathlib import Path

import pytest

from helpers import storage


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
