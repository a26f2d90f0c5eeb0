"""LoRAs and textual-inversion embeddings: fetched from a path, a hub id or a public Google Drive link, checked
(safetensors only, unless pickles are explicitly allowed; made for this base model), and applied with a scale.

The pipeline remembers its LoRAs and their scales (`active_loras`), so that the PNG parameters can name them.
"""
import re
import warnings
from pathlib import Path

from . import runtime, storage

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# Cross-attention width of the UNet -> the base model family that has it.
CROSS_ATTENTION_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
_DRIVE_ID = re.compile(r"(?:/file/d/|[?&]id=)([\w-]{10,})")


def _pickle_refusal(path) -> ValueError:
    return ValueError(f"{str(path)!r} is a pickle file ({Path(path).suffix}): loading one can run any code its "
                      "author put in it. Use the .safetensors version of this LoRA, or pass allow_pickle=True if you "
                      "trust where it came from. See TROUBLESHOOTING.md#pickle-refused")


def fetch(source: str, allow_pickle: bool = False, folder=None, family: str | None = None) -> Path:
    """A local path to the LoRA/embedding `source`: a local file or folder, a hub id ("owner/name" or
    "owner/name/file.safetensors"), a public Google Drive link, or any other link (a Civitai page or download link,
    a Hugging Face file URL: helpers.models.download, which refuses a LoRA Civitai says is for another `family`
    before its bytes are fetched); links are downloaded into the project's models/loras."""
    from . import models

    source = str(source).strip()
    path = Path(source).expanduser()
    if path.exists():
        local = path
    elif models.is_link(source) and "drive.google.com" not in source:
        local = models.download(source, kind="lora", family=family, dest=folder)
    elif source.startswith(("http://", "https://")):
        match = _DRIVE_ID.search(source)
        if "drive.google.com" not in source or not match:
            raise ValueError(f"{source!r} is not a Google Drive file link: pass a local path, a hub id, or a link "
                             "like https://drive.google.com/file/d/FILE_ID/view (shared as 'anyone with the link').")
        import gdown

        target = Path(folder) if folder else storage.project_paths().models / "loras"
        target.mkdir(parents=True, exist_ok=True)
        downloaded = gdown.download(id=match.group(1), output=str(target) + "/", quiet=True)
        if not downloaded:
            raise ValueError(f"Google Drive did not hand over {source!r}: share it as 'anyone with the link', or "
                             "download it and pass its path.")
        local = Path(downloaded)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+(/.+)?", source):
        from huggingface_hub import hf_hub_download, list_repo_files

        parts = source.split("/")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        if filename.endswith(PICKLE_SUFFIXES) and not allow_pickle:
            raise _pickle_refusal(source)
        try:
            if not filename:
                files = [f for f in list_repo_files(repo_id) if f.endswith(".safetensors")]
                if len(files) != 1:
                    raise ValueError(f"{repo_id!r} holds {len(files)} .safetensors files ({', '.join(files[:5])}): "
                                     f"name one, e.g. '{repo_id}/{files[0] if files else 'lora.safetensors'}'.")
                filename = files[0]
            local = Path(hf_hub_download(repo_id, filename))
        except OSError as e:  # not on the hub either (or no network)
            raise FileNotFoundError(f"No LoRA at {source!r}: not a local file, and the hub answered: {e}") from e
    else:
        raise FileNotFoundError(f"No LoRA at {source!r}: pass a file path, a hub id ('owner/name') or a public "
                                "Google Drive link.")
    if local.is_file() and local.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise _pickle_refusal(local)
        warnings.warn(f"Loading the pickle file {str(local)!r} (allow_pickle=True): it can run any code its author put "
                      "in it. Prefer a .safetensors version.", UserWarning, stacklevel=3)
    if local.is_file() and local.suffix.lower() not in PICKLE_SUFFIXES + (".safetensors",):
        raise ValueError(f"{str(local)!r} is neither a .safetensors file nor a known checkpoint format.")
    return local


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"No .safetensors file in {str(path)!r}.")
    return files[0]


def cross_attention_width(path: Path) -> int | None:
    """The cross-attention width a LoRA was trained for, read from the shapes of its attn2 key/value weights (the
    tensors themselves are not loaded). None for a LoRA that does not touch cross-attention."""
    from safetensors import SafetensorError, safe_open

    file = _weights_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if ("attn2" in key and ("to_k" in key or "to_v" in key) and key.endswith("weight")
                        and any(t in key for t in ("lora_A", "lora_down", "lora.down"))):
                    return int(f.get_slice(key).get_shape()[1])
    except SafetensorError as e:  # a download cut short, or another format renamed .safetensors
        raise ValueError(f"{str(file)!r} is damaged, cut short or not a safetensors file ({e}): download or copy it "
                         "again. See TROUBLESHOOTING.md#corrupt-safetensors") from e
    return None


def check_base(pipe, path: Path) -> None:
    """Raise ValueError where a LoRA was made for another base model than `pipe`'s (say which)."""
    expected = pipe.unet.config.cross_attention_dim if hasattr(pipe, "unet") else None
    found = cross_attention_width(path)
    if expected is None or found is None or found == expected:
        return
    made_for = CROSS_ATTENTION_FAMILIES.get(found, f"a model with cross-attention width {found}")
    this = CROSS_ATTENTION_FAMILIES.get(expected, f"a model with cross-attention width {expected}")
    raise ValueError(f"{str(path)!r} is a LoRA for {made_for}, but this pipeline ({type(pipe).__name__}) is {this}: "
                     "use a LoRA made for this base model, or load the model it was made for.")


def active_loras(pipe) -> dict[str, float]:
    """The LoRAs loaded into `pipe`, with their scales."""
    return dict(getattr(pipe, "_helpers_loras", {}))


# file and folder names that say nothing about the LoRA (a training run's export, peft's and diffusers' defaults)
GENERIC_NAMES = {"pytorch_lora_weights", "lora", "loras", "adapter_model", "diffusion_pytorch_model", "model"}


def adapter_name(path, taken=()) -> str:
    """The adapter name of the LoRA at `path`: its file stem, or where that is generic (a run's
    `runs/NAME/lora/pytorch_lora_weights.safetensors`) the nearest folder name above it that is not; made unique
    against `taken` with _2, _3, ..."""
    path = Path(path)
    is_file = path.suffix.lower() in PICKLE_SUFFIXES + (".safetensors",)
    candidates = [path.stem if is_file else path.name] + [p.name for p in path.parents][:2]
    cleaned = [re.sub(r"\W+", "_", c).strip("_") for c in candidates]
    name = next((c for c in cleaned if c and c.lower() not in GENERIC_NAMES), cleaned[0] or "lora")
    unique, n = name, 1
    while unique in taken:
        n += 1
        unique = f"{name}_{n}"
    return unique


def prepare(source: str, scale: float = 1.0, allow_pickle: bool = False, family: str | None = None) -> Path:
    """The local path of the LoRA `source` (see fetch), checked before any model is loaded: the scale's range, and
    that a .safetensors file is a LoRA, not a whole checkpoint or an embedding (one_file.check_lora)."""
    from . import one_file

    if not -4 <= scale <= 4:
        raise ValueError(f"LoRA `scale` must be between -4 and 4, not {scale!r} (1.0 is the trained strength).")
    path = fetch(source, allow_pickle=allow_pickle, family=family)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        cross_attention_width(path)  # a damaged file is named as such (it reads the header only)
        one_file.check_lora(path)
    return path


def load_lora(pipe, source: str, scale: float = 1.0, name: str | None = None, allow_pickle: bool = False) -> str:
    """Load a LoRA into `pipe` (alongside any loaded before) at `scale`; returns its adapter name (default: from its
    file, see adapter_name)."""
    from .diffusion import family_of

    path = prepare(source, scale=scale, allow_pickle=allow_pickle, family=family_of(pipe))
    if path.is_dir() or path.suffix.lower() == ".safetensors":  # an allowed pickle cannot be inspected safely
        check_base(pipe, path)
    loras = active_loras(pipe)
    if name is not None and name in loras:
        raise ValueError(f"A LoRA named {name!r} is loaded already: pass another `name`, or set_lora_scales().")
    files = {n: f for n, f in getattr(pipe, "_helpers_lora_files", {}).items() if n in loras}
    same = next((n for n, f in files.items() if f == path.resolve()), None)
    if name is None and same is not None:
        raise ValueError(f"{str(path)!r} is loaded already, as {same!r}: change its scale with set_lora_scales(), or "
                         "pass a `name` to load it twice.")
    name = name or adapter_name(path, taken=loras)
    weight_name = path.name if path.is_file() else None
    runtime.ignore_old_torchao()   # Colab's torchao 0.10 makes peft refuse every LoRA (runtime.py)
    from .fast import unfuse

    if unfuse(pipe):   # fused QKV would bypass the LoRA's q, k and v (helpers/fast.py)
        print("Fast path: the fused QKV projections are undone, so that the LoRA applies to q, k and v.")
    pipe.load_lora_weights(str(path.parent if path.is_file() else path), weight_name=weight_name, adapter_name=name)
    loras[name] = scale
    pipe._helpers_loras = loras
    pipe._helpers_lora_files = {**files, name: path.resolve()}
    pipe.set_adapters(list(loras), adapter_weights=list(loras.values()))
    return name


def set_lora_scales(pipe, scales: dict[str, float]) -> None:
    """Change the scales of loaded LoRAs (0 turns one off)."""
    loras = active_loras(pipe)
    unknown = set(scales) - set(loras)
    if unknown:
        raise ValueError(f"No LoRA named {', '.join(sorted(unknown))} is loaded; loaded: {', '.join(loras) or 'none'}.")
    loras.update(scales)
    pipe._helpers_loras = loras
    pipe.set_adapters(list(loras), adapter_weights=list(loras.values()))


def unload_loras(pipe) -> None:
    """Remove every LoRA: the pipeline is as loaded."""
    pipe.unload_lora_weights()
    pipe._helpers_loras = {}
    pipe._helpers_lora_files = {}


def lora_folders() -> list[Path]:
    """Where `<lora:NAME:W>` tags look for NAME.safetensors: the project's models/loras (and its subfolders), then
    each training run's lora/ folder (runs/*/lora, where the kohya export NAME.safetensors lies)."""
    paths = storage.project_paths()
    return [paths.models / "loras", paths.runs]


def find_lora(name: str) -> Path:
    """The file of the LoRA a prompt's `<lora:NAME:W>` tag names: NAME.safetensors (or NAME as written, with its
    suffix) in lora_folders(); FileNotFoundError naming the folders searched."""
    loras, runs = lora_folders()
    wanted = {name, f"{name}.safetensors"}
    candidates = (sorted(loras.rglob("*")) if loras.is_dir() else []) + (sorted(runs.glob("*/lora/*"))
                                                                         if runs.is_dir() else [])
    found = next((path for path in candidates if path.name in wanted and path.is_file()), None)
    if found:
        return found
    raise FileNotFoundError(f"No LoRA {name!r} for the prompt's <lora:{name}:...> tag: looked for {name}.safetensors "
                            f"in {loras} (and its subfolders) and {runs}/*/lora. Put the file there, or load it with "
                            "load_lora(pipe, PATH_OR_LINK).")


def apply_tags(pipe, tags: list[tuple[str, float]]) -> None:
    """Make `pipe`'s tag-loaded LoRAs those the prompt's tags name, at their weights (A1111's extra networks): new
    ones are loaded (find_lora), those a previous prompt named and this one does not are unloaded. LoRAs loaded with
    load_lora are left as they are, unless a tag names one (then the tag sets its scale)."""
    wanted: dict[str, float] = {}
    for name, weight in tags:
        if not -4 <= weight <= 4:
            raise ValueError(f"The weight {weight:g} of <lora:{name}:{weight:g}> must be between -4 and 4 (1.0 is "
                             "the trained strength).")
        wanted[name] = weight
    tagged = dict(getattr(pipe, "_helpers_tag_loras", {}))   # tag name -> adapter name
    stale = [adapter for name, adapter in tagged.items() if name not in wanted]
    paths = {name: find_lora(name) for name in wanted if name not in tagged and name not in active_loras(pipe)}
    if stale:
        pipe.delete_adapters(stale)
        pipe._helpers_loras = {n: s for n, s in active_loras(pipe).items() if n not in stale}
        pipe._helpers_lora_files = {n: f for n, f in getattr(pipe, "_helpers_lora_files", {}).items()
                                    if n not in stale}
        tagged = {name: adapter for name, adapter in tagged.items() if adapter not in stale}
    for name, path in paths.items():
        tagged[name] = load_lora(pipe, path, scale=wanted[name], name=re.sub(r"\W", "_", name))
    pipe._helpers_tag_loras = tagged
    scales = {tagged.get(name, name): weight for name, weight in wanted.items()}
    if scales:
        set_lora_scales(pipe, scales)
    elif stale and active_loras(pipe):
        pipe.set_adapters(list(active_loras(pipe)), adapter_weights=list(active_loras(pipe).values()))


def load_embedding(pipe, source: str, token: str | None = None, allow_pickle: bool = False) -> str:
    """Load a textual-inversion embedding; use its token (default: the file name in <angle brackets>) in prompts."""
    path = fetch(source, allow_pickle=allow_pickle)
    token = token or f"<{path.stem}>"
    pipe.load_textual_inversion(str(path), token=token)
    return token
