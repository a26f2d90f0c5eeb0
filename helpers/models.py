"""Model files from links: Civitai pages and download links, Hugging Face file URLs, any https link, public Google
Drive links; and the A1111 hashes of model files.

`download(url)` puts the file in the project's models/ folder (checkpoints/, loras/, embeddings/), with a progress
bar. The bytes go to a hidden `.NAME.part` beside the target, which gets its final name only once complete and (where
the link's source publishes one: Civitai) its SHA256 matches; an interrupted transfer resumes from the bytes it has
(HTTP Range). A link fetched before is reused without a request (models/.downloads.json). What Civitai's API says of
a version (file name, type, base model, size, hash) is known before any byte is fetched: `remote(url)` returns it,
so a LoRA for another base model is refused first. Tokens: CIVITAI_TOKEN and HF_TOKEN, from the environment or the
Colab secrets, never from a notebook.

`file_hash(path)` is the file's SHA256 (A1111's `Model hash` is its first 10 characters, `Lora hashes` its first 12),
computed once per file and cached by path, size and modification time.
"""
import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from . import storage

KINDS = {"checkpoint": "checkpoints", "lora": "loras", "embedding": "embeddings"}
CIVITAI_TYPES = {"Checkpoint": "checkpoint", "LORA": "lora", "LoCon": "lora", "DoRA": "lora",
                 "TextualInversion": "embedding"}
# Civitai's baseModel names, by the family a pipeline of this kit has (helpers.diffusion.family_of)
CIVITAI_FAMILIES = {"sd15": ("SD 1.4", "SD 1.5", "SD 1.5 LCM", "SD 1.5 Hyper"),
                    "sdxl": ("SDXL 0.9", "SDXL 1.0", "SDXL 1.0 LCM", "SDXL Turbo", "SDXL Lightning", "SDXL Hyper",
                             "Pony", "Illustrious", "NoobAI"),
                    "sd3": ("SD 3", "SD 3.5", "SD 3.5 Medium", "SD 3.5 Large", "SD 3.5 Large Turbo"),
                    "flux": ("Flux.1 S", "Flux.1 D", "Flux.1 Kontext")}
CIVITAI_API_ENV = "HELPERS_CIVITAI_API"   # tests: a local server in Civitai's shape
INDEX_NAME = ".downloads.json"
HASH_INDEX_NAME = "hashes.json"
CHUNK = 1 << 20
TIMEOUT_S = 60
_CIVITAI_PAGE = re.compile(r"^/models/(\d+)")   # a model page's path
_CIVITAI_DOWNLOAD = re.compile(r"/api/download/models/(\d+)")
_VERSION_QUERY = re.compile(r"modelVersionId=(\d+)")


class DownloadError(OSError):
    """A link that cannot be fetched: one line naming it, the cause and the fix."""


@dataclass
class Remote:
    """What is known of a link before its bytes are fetched."""
    url: str                        # what is fetched
    name: str | None = None         # the file name (Civitai's, else the link's own)
    kind: str | None = None         # checkpoint, lora or embedding (Civitai's type)
    base_model: str | None = None   # Civitai's baseModel: "SD 1.5", "SDXL 1.0", "Pony", ...
    sha256: str | None = None
    size: int | None = None         # bytes

    @property
    def family(self) -> str | None:
        """sd15, sdxl, sd3 or flux from the base model (None where unknown or none of those)."""
        return next((f for f, names in CIVITAI_FAMILIES.items() if self.base_model in names), None)


def is_link(text) -> bool:
    return isinstance(text, str) and text.strip().lower().startswith(("http://", "https://"))


def _secret(name: str) -> str | None:
    """An environment variable, else the Colab secret of that name (None where neither is set)."""
    if os.environ.get(name):
        return os.environ[name]
    with contextlib.suppress(Exception):   # not on Colab, or the notebook was not given access
        from google.colab import userdata

        return userdata.get(name) or None
    return None


def _civitai_api() -> str:
    return os.environ.get(CIVITAI_API_ENV, "https://civitai.com/api/v1").rstrip("/")


def _is_civitai(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    return host.endswith("civitai.com") or url.startswith(_civitai_api().rsplit("/api/", 1)[0])


def _headers(url: str) -> dict:
    headers = {"User-Agent": "llava-sd-notebooks"}
    host = urllib.parse.urlparse(url).hostname or ""
    token = _secret("CIVITAI_TOKEN") if _is_civitai(url) else _secret("HF_TOKEN") if host.endswith(
        "huggingface.co") else None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


class _Redirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects, without the token where one leads to another host: Civitai's download links redirect to a
    pre-signed storage URL, which must not receive the Civitai token (and refuses a second authorisation)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlparse(newurl).netloc != urllib.parse.urlparse(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_opener = urllib.request.build_opener(_Redirect)


def _open(url: str, headers: dict | None = None):
    request = urllib.request.Request(url, headers={**_headers(url), **(headers or {})})
    try:
        return _opener.open(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            secret = "CIVITAI_TOKEN" if _is_civitai(url) else "HF_TOKEN"
            raise DownloadError(f"{url} needs a token (HTTP {e.code}): add your {secret} as a Colab secret (key icon "
                                f"on the left, with notebook access) or set the {secret} environment variable; never "
                                "paste it into a notebook. See TROUBLESHOOTING.md#download-token") from None
        if e.code == 416:
            raise
        raise DownloadError(f"{url} gave HTTP {e.code} ({e.reason}): check the link in a browser.") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"Cannot reach {url} ({e.reason}): check the link, and that this machine is online.") \
            from None
    except (http.client.HTTPException, OSError) as e:   # the connection dropped before an answer
        raise DownloadError(f"{url} did not answer ({type(e).__name__}: {e}): run again in a moment.") from None


def _version_from_link(url: str) -> str | None:
    """The Civitai model-version id a link names (a download link, or a page with ?modelVersionId=)."""
    for pattern in (_CIVITAI_DOWNLOAD, _VERSION_QUERY):
        if m := pattern.search(url):
            return m.group(1)
    return None


def _api_json(path: str) -> dict:
    with _open(f"{_civitai_api()}/{path}") as response:
        try:
            return json.loads(response.read().decode("utf-8"))
        except ValueError:
            raise DownloadError(f"Civitai's API gave no JSON for {path}: try again later, or pass the file's "
                                "download link.") from None


def remote(url: str) -> Remote:
    """What the link will give, before any of its bytes: from Civitai's API for a Civitai page or download link
    (name, type, base model, size, SHA256 of the version's primary file); for other links, the name in the URL."""
    url = url.strip()
    if not is_link(url):
        raise ValueError(f"Not a link: {url!r}. Pass an http(s) URL (a Civitai page or download link, a Hugging Face "
                         "file URL, a direct link).")
    page = _CIVITAI_PAGE.search(urllib.parse.urlparse(url).path)
    if _is_civitai(url) and (page or _CIVITAI_DOWNLOAD.search(url)):
        version_id = _version_from_link(url)
        if version_id:
            version = _api_json(f"model-versions/{version_id}")
        else:
            model = _api_json(f"models/{page.group(1)}")
            versions = model.get("modelVersions") or []
            if not versions:
                raise DownloadError(f"{url}: this Civitai model has no version to download.")
            version = {**versions[0], "model": {"type": model.get("type"), "name": model.get("name")}}
        files = version.get("files") or []
        main = next((f for f in files if f.get("primary")), files[0] if files else {})
        size_kb = main.get("sizeKB")
        return Remote(url=main.get("downloadUrl") or version.get("downloadUrl") or url, name=main.get("name"),
                      kind=CIVITAI_TYPES.get((version.get("model") or {}).get("type")),
                      base_model=version.get("baseModel"), sha256=((main.get("hashes") or {}).get("SHA256") or
                                                                   "").lower() or None,
                      size=round(size_kb * 1024) if size_kb else None)
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or None
    return Remote(url=url, name=name)


def check_family(info: Remote, family: str, what: str = "LoRA") -> None:
    """Refuse, before the download, a file Civitai says is for another base model than `family`'s."""
    if info.base_model and info.family and info.family != family:
        raise ValueError(f"{info.url}: this {what} is for {info.base_model} ({info.family}), and the pipeline is "
                         f"{family}: pick the version made for {family}, or load a {info.family} model. See "
                         "TROUBLESHOOTING.md#lora-wrong-base")


def _index_path() -> Path:
    return storage.project_paths().models / INDEX_NAME


def _read_index() -> dict:
    try:
        return json.loads(_index_path().read_text())
    except (OSError, ValueError):
        return {}


def _remember(url: str, path: Path, info: Remote) -> None:
    index = _read_index()
    index[url] = {"path": str(path), "size": path.stat().st_size, **{k: v for k, v in asdict(info).items()
                                                                      if k in ("sha256", "kind", "base_model")}}
    _write_best_effort(_index_path(), index)   # a lost index entry only costs a new download


def downloaded(url: str) -> Path | None:
    """The file a link was downloaded to before (None where it was not, or the file has changed since)."""
    return _reused(url.strip())


def _reused(url: str) -> Path | None:
    entry = _read_index().get(url)
    if entry and Path(entry["path"]).is_file() and Path(entry["path"]).stat().st_size == entry.get("size"):
        return Path(entry["path"])
    return None


def _file_name(response, info: Remote) -> str:
    """The name to save under: Civitai's, else Content-Disposition's, else the URL's last part."""
    disposition = response.headers.get("Content-Disposition") or ""
    m = re.search(r"filename\*=UTF-8''([^;]+)", disposition) or re.search(r'filename="?([^";]+)"?', disposition)
    name = info.name or (urllib.parse.unquote(m.group(1)) if m else None) or \
        Path(urllib.parse.urlparse(response.url).path).name
    from .paths import safe_file_name

    return safe_file_name(name, default="model.safetensors")


def _check_space(folder: Path, need: int, url: str) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DownloadError(f"{url} needs {storage.size_text(need)} and {folder} has {storage.size_text(free)} free: free "
                            "some space (Drive: empty the bin, delete old runs) and run again; the part already "
                            "downloaded is kept and resumed. See TROUBLESHOOTING.md#disk-full")


def download(url: str, kind: str | None = None, family: str | None = None, dest=None, progress: bool = True) -> Path:
    """Fetch the file behind `url` into `dest` (default: the project's models/<kind>s/), atomically, resuming a cut
    transfer, verifying Civitai's SHA256; a link fetched before is reused with no request. `kind`: checkpoint, lora
    or embedding (Civitai's type where omitted); `family`: refuse, before the download, a file Civitai says is for
    another base model. Only .safetensors (and .gguf) are kept: a pickle or a web page is refused. Returns the file."""
    url = url.strip()
    if kind is not None and kind not in KINDS:
        raise ValueError(f"`kind` must be one of {', '.join(KINDS)}, not {kind!r}.")
    if (found := _reused(url)) is not None:
        print(f"Already downloaded: {found}")
        return found
    if "drive.google.com" in url:
        return _download_drive(url, kind, dest)
    info = remote(url)
    if family:
        check_family(info, family, "LoRA" if (kind or info.kind) == "lora" else "model")
    if kind and info.kind and kind != info.kind:
        raise ValueError(f"{url} is a {info.kind} on Civitai, not a {kind}: pass it where a {info.kind} goes. See "
                         "TROUBLESHOOTING.md#wrong-kind-link")
    folder = Path(dest) if dest is not None else storage.project_paths().models / KINDS[kind or info.kind or
                                                                                         "checkpoint"]
    folder.mkdir(parents=True, exist_ok=True)
    # named after the link, so that a second run finds what a cut transfer left, whatever the file's name
    part = folder / f".download-{hashlib.sha256(info.url.encode()).hexdigest()[:16]}.part"
    have = part.stat().st_size if part.is_file() else 0
    try:
        response = _open(info.url, {"Range": f"bytes={have}-"} if have else None)
    except urllib.error.HTTPError as e:   # 416: the part already holds every byte; ask for the headers only
        if e.code != 416:
            raise
        response = _open(info.url, {"Range": "bytes=0-0"})
        have = -1
    with response:
        name = _file_name(response, info)
        _refuse_content(response, url, name)
        target = folder / name
        if target.is_file() and info.sha256 and file_hash(target) == info.sha256:   # there, but not in the index
            _remember(url, target, info)
            print(f"Already downloaded: {target}")
            return target
        if have == -1:
            have = part.stat().st_size
        else:
            have = have if have and response.status == 206 else 0
            length = int(response.headers.get("Content-Length") or 0)
            total = have + length if length else info.size
            if total:
                _check_space(folder, total - have, url)
            _stream(response, part, have, total, name, url, progress)
    if info.sha256 and file_hash(part, cache=False) != info.sha256:
        part.unlink()
        raise DownloadError(f"{url}: the file downloaded does not match Civitai's SHA256 ({info.sha256[:10]}...): it "
                            "was deleted; run again to download it anew. See TROUBLESHOOTING.md#hash-mismatch")
    os.replace(part, target)
    storage.fsync_dir(folder)
    _remember(url, target, info)
    print(f"Downloaded {target} ({storage.size_text(target.stat().st_size)}).")
    return target


def _refuse_content(response, url: str, name: str) -> None:
    kind = (response.headers.get("Content-Type") or "").lower()
    if kind.startswith("text/html"):
        raise DownloadError(f"{url} gave a web page, not a model file (a login or a 'confirm download' page?): pass "
                            "the file's own download link; for Civitai models that need a login, set CIVITAI_TOKEN. "
                            "See TROUBLESHOOTING.md#download-token")
    if not name.lower().endswith((".safetensors", ".gguf")):
        raise DownloadError(f"{url} gives {name!r}, which is not a .safetensors (or .gguf) file: pickle files "
                            "(.ckpt, .pt, .bin) can run code, so the kit does not download them. Pick the "
                            "SafeTensor version of the model.")


def _stream(response, part: Path, have: int, total: int | None, name: str, url: str, progress: bool) -> None:
    """The response's bytes onto `part` (appended from `have` on, or anew), with a progress bar. A cut or a full
    disk keeps what arrived, for the next run to resume."""
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=name, disable=not progress) as bar, \
            part.open("ab" if have else "wb") as f:
        try:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                have += len(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as e:
            if getattr(e, "errno", None) == errno.ENOSPC:
                raise DownloadError(f"The disk filled while downloading {url} ({storage.size_text(have)} of it kept in "
                                    f"{part}; {storage.free_space(part)}): free some space and run again; it "
                                    "resumes. See TROUBLESHOOTING.md#disk-full") from None
            raise DownloadError(f"The download of {url} was cut after {storage.size_text(have)} ({e}): run again; it "
                                "resumes from there.") from None
    if total and have < total:
        raise DownloadError(f"The download of {url} was cut after {storage.size_text(have)} of {storage.size_text(total)}: "
                            "run again; it resumes from there.")


def _download_drive(url: str, kind: str | None, dest) -> Path:
    import gdown

    folder = Path(dest) if dest is not None else storage.project_paths().models / KINDS[kind or "checkpoint"]
    folder.mkdir(parents=True, exist_ok=True)
    path = gdown.download(url, output=str(folder) + os.sep, quiet=False, fuzzy=True, resume=True)
    if not path:
        raise DownloadError(f"Could not download {url} from Google Drive: share the file as 'Anyone with the link'.")
    path = Path(path)
    if not path.name.lower().endswith((".safetensors", ".gguf")):
        path.unlink(missing_ok=True)
        raise DownloadError(f"{url} gave {path.name!r}, not a .safetensors file: the kit loads only safetensors.")
    _remember(url, path, Remote(url=url, kind=kind))
    return path


# ----------------------------------------------------------------------------------------------------------- hashes

def _hash_index() -> Path:
    return storage.cache_root() / HASH_INDEX_NAME


def _write_best_effort(path: Path, data: dict) -> None:
    """An index the kit can make again, written atomically where it can be; never retried, never to the fallback
    (nothing reads it there), never a stop."""
    with contextlib.suppress(OSError), storage.atomic_open(path, "w") as f:
        f.write(json.dumps(data, indent=1))


_HASHES: dict = {}   # this session's, in front of the index on disk


def legacy_hash(path) -> str:
    """A1111's old model hash (before 1.0's SHA256), which kohya still writes as `ss_sd_model_hash`: the first 8 hex
    digits of the SHA256 of the 64 KiB at offset 1 MiB. Reads 64 KiB, so it is never cached."""
    with Path(path).open("rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def file_hash(path, cache: bool = True) -> str:
    """The SHA256 of a file (hex), computed once: cached by full path, size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    index = {}
    if cache:
        if key in _HASHES:
            return _HASHES[key]
        with contextlib.suppress(OSError, ValueError):
            index = json.loads(_hash_index().read_text())
        if key in index:
            _HASHES[key] = index[key]
            return index[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if cache:
        _HASHES[key] = index[key] = value
        _write_best_effort(_hash_index(), index)
    return value
