"""One place that turns a model name and a task into a loaded model: load_sd(...) and load_llava(...).

The name goes through the registry (so SMOKE MODE swaps in the tiny models; a file the user gives is never swapped)
and the dtype follows the runtime's policy (fp16 on a T4, bf16 from Ampere on, fp32 on CPU). Only safetensors weights
are loaded; remote code never runs. A one-file `.safetensors` checkpoint (A1111/Civitai) loads offline through
helpers.one_file. On a GPU the planner checks that the model fits before anything is downloaded.
"""
import warnings
from pathlib import Path

from . import memory, registry, runtime

SD_PIPELINES = {"txt2img": "AutoPipelineForText2Image", "img2img": "AutoPipelineForImage2Image",
                "inpaint": "AutoPipelineForInpainting"}
QUANTIZATIONS = ("auto", "4bit", "8bit", "none")


def _damaged_files(source) -> list[str]:
    """The .safetensors files of a local model folder whose header cannot be read (cut short, or not safetensors)."""
    from pathlib import Path

    from safetensors import safe_open

    damaged = []
    for path in sorted(Path(source).rglob("*.safetensors")) if Path(source).is_dir() else []:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception:  # SafetensorError, or an OSError of the file itself
            damaged.append(str(path))
    return damaged


def _load_error(resolved, error: Exception) -> OSError:
    from pathlib import Path

    from huggingface_hub.errors import GatedRepoError
    from safetensors import SafetensorError

    spec = resolved.spec
    damaged = _damaged_files(resolved.source)
    if damaged or isinstance(error, SafetensorError):
        return OSError(f"Could not load {resolved.source!r}: {', '.join(map(repr, damaged)) or 'a weights file'} is "
                       f"damaged, cut short or not a safetensors file ({type(error).__name__}: {error}). Delete it and "
                       "download or copy it again (a hub download: `hf cache delete`, then load again). See "
                       "TROUBLESHOOTING.md#corrupt-safetensors")
    pickles = sorted(str(p) for p in Path(resolved.source).rglob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth")) \
        if Path(resolved.source).is_dir() else []
    if pickles and "safetensors" in str(error):
        return OSError(f"Could not load {resolved.source!r}: its weights are pickle files ({', '.join(pickles[:3])}), "
                       "which can run any code their author put in them; only safetensors are loaded. If you trust "
                       "the source, convert it once: DiffusionPipeline.from_pretrained(folder, use_safetensors=False)"
                       ".save_pretrained(new_folder) writes safetensors. See TROUBLESHOOTING.md#pickle-refused")
    unauthorised = isinstance(error, GatedRepoError) or getattr(getattr(error, "response", None), "status_code",
                                                                None) == 401
    gated = (f" {spec.name if spec and spec.gated else resolved.source + ' is private or'} is gated: accept its "
             "licence on its hub page, then add your token as the Colab secret HF_TOKEN (key icon on the left, with "
             "notebook access) or set the HF_TOKEN environment variable (TROUBLESHOOTING.md#gated-model)."
             if (spec and spec.gated) or unauthorised else "")
    return OSError(f"Could not load {resolved.source!r}: {str(error).rstrip('.')}.{gated} Without network access, "
                   "run with HELPERS_TINY=1 to use the tiny offline models; `python -m helpers doctor` checks the rest "
                   "(TROUBLESHOOTING.md#load-failed).")


def _plan_name(resolved) -> str | None:
    """What the planner is asked about for `resolved`: the catalogue name, the file, the folder or the hub id (None
    for the tiny stand-ins, which always fit)."""
    if resolved.tiny:
        return None
    return resolved.spec.name if resolved.spec is not None else resolved.source


def _planned(check, what: str, default):
    """`check()`, or `default` with a warning where the planner cannot get the configs (a hub id offline)."""
    from .planner import PlanUnavailable

    try:
        return check()
    except PlanUnavailable as e:
        warnings.warn(f"{e} Loading {what} without a memory plan.", UserWarning, stacklevel=3)
        return default


def main_weights_file(resolved, variant: str | None = None) -> str | None:
    """The one file whose hash names the model (A1111's `Model hash`): a one-file checkpoint itself; for a folder or
    a hub model, its UNet's (or transformer's) single weights file where it is on this machine, else None."""
    if resolved.single_file:
        return resolved.source
    names = [f"diffusion_pytorch_model.{variant}.safetensors"] if variant else []
    names.append("diffusion_pytorch_model.safetensors")
    for sub in ("unet", "transformer"):
        for file in names:
            if Path(resolved.source).is_dir():
                if (Path(resolved.source) / sub / file).is_file():
                    return str(Path(resolved.source) / sub / file)
            else:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(resolved.source, f"{sub}/{file}", revision=resolved.revision)
                if isinstance(cached, str):
                    return cached
    return None


def load_sd(name: str = "sd15", task: str = "txt2img", dtype=None, profile: runtime.Profile | None = None):
    """A diffusers pipeline for `task` ("txt2img", "img2img" or "inpaint") from a catalogue name or alias, a hub id,
    a folder or a one-file `.safetensors` checkpoint, in the runtime's dtype, on its device. SDXL from the hub in fp16
    gets the fp16-fix VAE (the stock one overflows to black); a one-file SDXL keeps its own VAE, which diffusers
    decodes in fp32 (force_upcast), so that no hub call is made. An inpainting file loads for "inpaint" only.
    The pipeline records `_helpers_model_name` (the file's stem, or the catalogue name) and `_helpers_model_file`
    (main_weights_file) for the PNG metadata."""
    if task not in SD_PIPELINES:
        raise ValueError(f"`task` must be one of {', '.join(SD_PIPELINES)}, not {task!r}.")
    from . import models

    if models.is_link(name):   # a Civitai, Hugging Face or direct link: the file, downloaded once (models.py)
        name = str(models.download(name, kind="checkpoint"))
    resolved = registry.resolve(name, task=task)
    if resolved.family == "llava_next":
        raise ValueError(f"{name!r} is a LLaVA model: load it with load_llava({name!r}).")
    import diffusers
    from safetensors import SafetensorError
    import torch

    from . import one_file

    if resolved.single_file:  # refused before anything is planned or loaded
        info = one_file.inspect(resolved.source)
        one_file.check_task(info, task)
        one_file.config_folder(info)
    profile = profile or runtime.detect_profile()
    dtype = dtype or runtime.pick_dtype(profile)
    placement = profile.device
    plan_name = _plan_name(resolved)
    if plan_name is not None and profile.device == "cuda":  # say it before a download of many GB, not after
        placement = _planned(lambda: memory.sd_placement(plan_name, str(dtype).split(".")[-1], profile), plan_name,
                             "gpu")
    kwargs = {"dtype": dtype, "use_safetensors": True}
    if resolved.revision:
        kwargs["revision"] = resolved.revision
    if not resolved.tiny and resolved.spec and resolved.spec.fp16_variant and dtype == torch.float16:
        kwargs["variant"] = "fp16"
    try:
        if resolved.single_file:
            pipe = one_file.load(resolved.source, task=task, dtype=dtype)
        else:
            if resolved.family == "sdxl" and dtype == torch.float16 and not resolved.tiny:
                kwargs["vae"] = diffusers.AutoencoderKL.from_pretrained(registry.SDXL_FP16_VAE, dtype=dtype,
                                                                        use_safetensors=True)
            pipe = getattr(diffusers, SD_PIPELINES[task]).from_pretrained(resolved.source, **kwargs)
    except (OSError, SafetensorError) as e:  # not found, gated, or a damaged weights file
        if isinstance(e, one_file.CheckpointFileError) or resolved.single_file:
            raise
        raise _load_error(resolved, e) from e
    # what the PNG parameters call it (A1111: the file's stem, or the catalogue name) and the file its hash is of
    pipe._helpers_model_name = (Path(resolved.source).stem if resolved.single_file
                                else resolved.spec.name if resolved.spec is not None else name)
    pipe._helpers_model_file = main_weights_file(resolved, kwargs.get("variant"))
    if placement == "model_offload":
        print(f"{name} does not fit this GPU whole: each part moves to it while it runs (model CPU offload).")
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(profile.device)
    if profile.device == "cuda" and profile.vram_gb < 16:
        pipe.vae.enable_slicing()  # decode a batch one image at a time: the same images, a lower peak
    return pipe


def choose_quantization(resolved, profile: runtime.Profile) -> str:
    """"none" where the 16-bit weights, KV cache and activations fit in VRAM (helpers.planner), else "4bit" (nf4: on
    a T4 that is every LLaVA; bitsandbytes' 8-bit is slower than nf4, so it is never the automatic choice). Always
    "none" on CPU and for the tiny models."""
    if profile.device != "cuda" or resolved.tiny:
        return "none"
    return _planned(lambda: memory.choose_quantization(_plan_name(resolved), profile), resolved.source, "none")


def load_llava(name: str = "llava-1.6-mistral-7b", quantization: str = "auto", profile: runtime.Profile | None = None):
    """(model, processor) of a LLaVA 1.6 checkpoint. quantization: "auto", "4bit" (nf4, double quant, compute in the
    runtime dtype), "8bit" or "none". On a GPU the weights go straight to it (device_map), never through a full copy
    in RAM."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"`quantization` must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}.")
    resolved = registry.resolve(name, task="vlm")
    if resolved.family not in ("llava_next", None):
        raise ValueError(f"{name!r} is a {resolved.family} image generator: load it with load_sd({name!r}).")
    plan_name = _plan_name(resolved)
    from safetensors import SafetensorError
    from transformers import AutoProcessor, BitsAndBytesConfig, LlavaNextForConditionalGeneration

    profile = profile or runtime.detect_profile()
    dtype = runtime.pick_dtype(profile)
    if quantization == "auto":
        quantization = choose_quantization(resolved, profile)
    if plan_name is not None and profile.device == "cuda":  # say it before a 15 GB download, not after
        _planned(lambda: memory.check_fits(plan_name, profile.dtype_name if quantization == "none" else quantization,
                                           profile), plan_name, None)
    kwargs = {"dtype": dtype, "revision": resolved.revision, "use_safetensors": True}
    if profile.device == "cuda":
        kwargs["device_map"] = {"": 0}
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    try:
        model = LlavaNextForConditionalGeneration.from_pretrained(resolved.source, **kwargs).eval()
        processor = AutoProcessor.from_pretrained(resolved.source, revision=resolved.revision)
    except (OSError, SafetensorError) as e:  # not found, gated, or a damaged weights file
        raise _load_error(resolved, e) from e
    if profile.device == "mps":
        model = model.to("mps")
    return model, processor
