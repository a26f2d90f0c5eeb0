"""Paths a user types (a dataset, a run folder): stripped, never empty, and never a folder so broad that writing
into it would touch the user's other files (the current folder, the home folder, Drive's root, the project folder)."""
import os
from pathlib import Path

_QUOTES = "\"'"


def user_path(value, field: str, allow_none: bool = False) -> Path | None:
    """`value` as a Path: surrounding spaces and pasted quotes stripped, `~` expanded. An empty one (or None, unless
    `allow_none`) is refused with a ValueError naming `field`: a blank path must never mean "the current folder"."""
    if value is None and allow_none:
        return None
    text = str(value).strip().strip(_QUOTES).strip() if isinstance(value, (str, os.PathLike)) else ""
    if not text:
        raise ValueError(f"`{field}` must be a path, not {value!r}: type the folder's full path, e.g. "
                         "/content/drive/MyDrive/llava-sd-notebooks/datasets/my_style.")
    return Path(text).expanduser()


def _broad_folders() -> dict[Path, str]:
    from . import storage

    folders = {Path.cwd(): "the current folder", Path("/"): "the file system's root", Path.home(): "the home folder",
               Path("/content"): "Colab's working folder", Path("/content/drive"): "Drive's mount point",
               Path("/content/drive/MyDrive"): "your whole Drive", Path("/content/drive/My Drive"): "your whole Drive"}
    root = storage.project_root()
    folders[root] = "the project folder"
    for name in ("outputs", "datasets", "models", "runs"):
        folders[root / name] = f"the project's {name}/ folder itself"
    return {p.resolve(): why for p, why in folders.items()}


def refuse_broad(path, field: str) -> Path:
    """`path`, unless it resolves to a folder that holds far more than one dataset or run (see _broad_folders):
    then a ValueError naming `field`, the folder and why."""
    path = Path(path)
    why = _broad_folders().get(path.expanduser().resolve())
    if why:
        raise ValueError(f"`{field}` is {str(path)!r}, which is {why} ({path.expanduser().resolve()}): name one "
                         "folder of its own, e.g. .../datasets/my_style or .../runs/my_lora.")
    return path
