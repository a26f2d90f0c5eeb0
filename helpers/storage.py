"""Where files go: Google Drive on Colab (with a local fallback), the project folder layout, and atomic writes.

Every file the project saves goes through `atomic_write`/`atomic_open`: the data is written to a temporary file in the
same folder, flushed to disk, then renamed over the target in one step, so a crash mid-write leaves the old file whole.
"""
import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT = "llava-sd-notebooks"
ENV_HOME = "HELPERS_HOME"              # overrides where the project folder is
ENV_CACHE = "HELPERS_CACHE"            # overrides where rebuildable files go (tiny models, tokenizers, hashes)
COLAB_MOUNT = Path("/content/drive")
COLAB_DRIVE_ROOT = COLAB_MOUNT / "MyDrive" / PROJECT
COLAB_LOCAL_ROOT = Path("/content") / f"{PROJECT}-data"   # when Drive cannot be mounted: lost at disconnect

_root: Path | None = None              # set by mount_drive()

ASSETS = Path(__file__).resolve().parents[1] / "assets"   # the sample files that ship with the project
# The machine's own disk, for what cannot be written to Drive (kept only as long as the session)
LOCAL_FALLBACK = Path(tempfile.gettempdir()) / f"{PROJECT}-fallback"
WRITE_RETRY_DELAYS_S = (1, 5)   # waits between tries of a file write that failed (Drive hiccups), before the fallback


@dataclass(frozen=True)
class ProjectPaths:
    root: Path
    outputs: Path    # generated images, captions, transcripts
    datasets: Path   # training images and captions
    models: Path     # trained LoRAs, DreamBooth models, exports
    runs: Path       # training runs: checkpoints, samples, logs


def cache_root() -> Path:
    """Where the kit keeps what it can make again (tiny models, the CLIP tokenizer, file hashes): HELPERS_CACHE,
    else ~/.cache/llava-sd-notebooks."""
    return Path(os.environ.get(ENV_CACHE, Path.home() / ".cache" / PROJECT)).expanduser()


def default_root() -> Path:
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser()
    return Path.home() / PROJECT


def mount_drive(mountpoint: Path = COLAB_MOUNT) -> Path:
    """Mount Google Drive on Colab and use MyDrive/llava-sd-notebooks; elsewhere, or when mounting fails, a local
    folder (and say so). Returns the project root."""
    global _root
    if os.environ.get(ENV_HOME):
        _root = default_root()
    else:
        try:
            from google.colab import drive
        except ImportError:
            _root = default_root()
        else:
            try:
                drive.mount(str(mountpoint))
                _root = mountpoint / "MyDrive" / PROJECT
            except Exception as e:  # a refused authorisation, a timeout: go on with a local folder
                _root = COLAB_LOCAL_ROOT
                print(f"Drive could not be mounted ({type(e).__name__}: {e}). Saving to {_root} instead: "
                      "these files are lost when the session ends; download them, or run this cell again to retry.")
    return project_paths(_root).root


def project_root() -> Path:
    """The project folder: HELPERS_HOME if set, else the one mount_drive() chose, else ~/llava-sd-notebooks."""
    if os.environ.get(ENV_HOME):
        return default_root()
    return _root or default_root()


def project_paths(root: Path | str | None = None) -> ProjectPaths:
    """The project folder layout (created on first use)."""
    root = Path(root) if root is not None else project_root()
    paths = ProjectPaths(root=root, outputs=root / "outputs", datasets=root / "datasets", models=root / "models",
                         runs=root / "runs")
    for p in (paths.outputs, paths.datasets, paths.models, paths.runs):
        # a read-only or broken HELPERS_HOME (doctor reports it): nothing made is lost, as each write then goes to
        # the local fallback with a notice (write_with_fallback)
        with contextlib.suppress(OSError):
            p.mkdir(parents=True, exist_ok=True)
    return paths


class WriteFailed(OSError):
    """A file could be written neither where it belongs nor to the local fallback (both disks full, say)."""


def is_write_failure(error: BaseException) -> bool:
    """Whether `error` is a failed write (disk full, Drive gone, read-only): an OSError, or what libraries raise for
    the same causes instead: safetensors' SafetensorError ("I/O error: No space left on device") and torch.save's
    RuntimeError from its zip writer ("[enforce fail at inline_container.cc] ... unexpected pos")."""
    if isinstance(error, OSError):
        return True
    text = str(error)
    if type(error).__name__ == "SafetensorError":
        return "I/O error" in text or "os error" in text
    return isinstance(error, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)


def free_space(path) -> str:
    """'12.0 MiB free of 15.0 GiB' on the file system of `path` (or of its nearest folder that exists)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown"
    return f"{size_text(usage.free)} free of {size_text(usage.total)}"


def size_text(n: int) -> str:
    """A byte count as people read it: 1000 B, 12.0 MiB, 15.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _mode_for(path: Path) -> int:
    """The permission bits a rewritten `path` gets: those of the file it replaces, else what a new file gets under
    the umask (not mkstemp's 0600, which would hide a shared dataset's captions from other users)."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", encoding: str | None = None):
    """Open a temporary file beside `path`; on a clean exit it replaces `path` in one step, on an error it is removed
    and `path` is left as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', not {mode!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _mode_for(path))
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _write_once(path, data: bytes | str, encoding: str) -> None:
    if isinstance(data, str):
        with atomic_open(path, "w", encoding=encoding) as f:
            f.write(data)
    else:
        with atomic_open(path, "wb") as f:
            f.write(data)


def fallback_path(path) -> Path:
    """Where a file that cannot be written to `path` goes: the same place under LOCAL_FALLBACK, relative to the
    project folder where `path` is in it; else under `elsewhere/<folder name>-<hash of its full path>/`, so that two
    folders of the same name never share a fallback."""
    path = Path(path).expanduser().absolute()
    try:
        relative = path.resolve().relative_to(project_root().resolve())
    except ValueError:
        key = hashlib.sha256(str(path.parent.resolve()).encode()).hexdigest()[:10]
        relative = Path("elsewhere", f"{path.parent.name}-{key}", path.name)
    return LOCAL_FALLBACK / relative


def cannot_write(what, path, error, fallback=None, fallback_error=None) -> WriteFailed:
    """The one-line stop when `what` could not be written to `path` (nor to `fallback`): the cause, the free space
    there and the fix."""
    where = f" nor to {fallback} on this machine's disk ({fallback_error}; {free_space(fallback)})" if fallback else ""
    return WriteFailed(f"Could not write {what} to {path} ({error}; {free_space(path)}){where}. Free some space (on "
                       "Drive: empty its bin, delete old runs or samples) or mount Drive again, then run the same "
                       "cell again: nothing finished is lost. See TROUBLESHOOTING.md#disk-full")


def write_with_fallback(path, write, what: str | None = None) -> Path:
    """Call `write(path)` (which writes the whole file atomically); a write that fails (Drive gone, disk full: see
    is_write_failure) is tried again after WRITE_RETRY_DELAYS_S, then `write(fallback_path(path))` on this machine's
    disk, with a message saying where. Where that fails too, WriteFailed (one line: the cause, the free space, the
    fix). Returns the path the file is at."""
    what = what or Path(path).name
    for delay in (*WRITE_RETRY_DELAYS_S, None):
        try:
            write(Path(path))
            return Path(path)
        except Exception as e:
            if not is_write_failure(e):
                raise
            error = e
            if delay is not None:
                print(f"Writing {path} failed ({e}); trying again in {delay} s.")
                time.sleep(delay)
    target = fallback_path(path)
    try:
        write(target)
    except Exception as e:
        if not is_write_failure(e):
            raise
        raise cannot_write(what, path, error, target, e) from e
    print(f"Could not write {path} ({error}). Saved it to {target} on this machine's disk instead: it is lost when "
          "the session ends; copy it to Drive once Drive works again (see TROUBLESHOOTING.md#drive-write-fails).")
    return target


def atomic_write(path, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write `data` to `path` atomically (see atomic_open), through write_with_fallback: retried, then saved to the
    local fallback with a message, else one WriteFailed line. Returns the path the file is at."""
    return write_with_fallback(path, lambda target: _write_once(target, data, encoding))


def write_folder(target, write, what: str) -> Path:
    """A folder written whole or not at all: `write(staging)` fills a hidden staging folder beside `target`, which
    then replaces `target`. A failed write leaves the old folder as it was, and a full disk or a gone Drive is one
    WriteFailed line naming `what`."""
    import shutil

    target = Path(target)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write(staging)
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        if not is_write_failure(e):
            raise
        raise cannot_write(what, staging, e) from e
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    fsync_dir(target.parent)
    return target


def fsync_dir(folder: Path) -> None:
    """Make the rename itself durable where the file system allows it (not on every FUSE mount, such as Drive)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def next_free_path(folder, suffix: str, label: str = "") -> Path:
    """`folder/NNNNN[-label]suffix` with the next number after the highest one there (A1111's naming), so a new
    file never overwrites an earlier one. Numbers taken in the folder's local fallback (files saved there while Drive
    failed) count too, so a file that falls back later never overwrites one that fell back before."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name[:5]) for d in {folder, fallback_path(folder)} if d.is_dir() for p in d.iterdir()
               if p.name[:5].isdigit()]
    n = max(numbers, default=-1) + 1
    return folder / f"{n:05d}{'-' + label if label else ''}{suffix}"
