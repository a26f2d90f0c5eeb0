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


_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_NOT_IN_NAMES = set('<>:"/\\|?*')


def safe_file_name(text, default: str = "output", max_chars: int = 100) -> str:
    """A file name made from user text (a trigger word, a run name) that stays in its folder and is valid on Windows,
    macOS and Linux: path separators, `<>:"|?*` and control characters become `_`, leading and trailing dots and
    spaces go, Windows' reserved names (CON, NUL, COM1, ...) get a `_` in front. `default` where nothing is left."""
    name = "".join("_" if c in _NOT_IN_NAMES or ord(c) < 32 or ord(c) == 127 else c for c in str(text or ""))
    name = name.strip(" .")[:max_chars].strip(" .")
    if name.split(".")[0].upper() in _RESERVED:
        name = "_" + name
    return name or default


def plain_name(value, field: str) -> str:
    """A name typed for one folder of the project (a run name): stripped, never empty, and a plain file name (no
    `/`, `..` or characters Windows refuses), else a ValueError naming `field` and a name that would do."""
    text = str(value if value is not None else "").strip()
    if not text or safe_file_name(text, default="") != text:
        suggestion = safe_file_name(text, default="my-run")
        raise ValueError(f"`{field}` must be a plain folder name (letters, digits, spaces, - and _), not {value!r}: "
                         f"e.g. {suggestion!r}.")
    return text
