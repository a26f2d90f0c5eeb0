import pytest

from helpers import storage


@pytest.fixture(autouse=True)
def _fresh_storage_root(monkeypatch):
    """mount_drive() remembers its choice in the module; each test starts without one."""
    monkeypatch.setattr(storage, "_root", None)
