"""One place that turns a model name and a task into a loaded model: load_sd(...) and load_llava(...).

The name goes through the registry (so SMOKE MODE swaps in the tiny models; a file the user gives is never swapped)
and the dtype follows the runtime's policy (fp16 on a T4, bf16 from Ampere on, fp32 on CPU). Only safetensors weights
are loaded; remote code never runs. A one-file `.safetensors` checkpoint (A1111/Civitai) loads offline through
helpers.one_file. On a GPU the planner checks that the model fits before anything is downloaded.
"""
import dataclasses
import warnings
from contextlib import contextmanager
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


# What quantization="4bit"/"8bit" applies to where the planner's Route does not say: the denoiser and the T5 encoder
# (the two large parts of FLUX and SD3: FACTS.md); the CLIP encoders and the VAE are small and stay 16-bit.
QUANTIZED_PARTS = {"flux": ("transformer", "text_encoder_2"), "sd3": ("transformer", "text_encoder_3"),
                   "sdxl": ("unet",), "sd15": ("unet",)}
T5_ENCODERS = {"flux": "text_encoder_2", "sd3": "text_encoder_3"}
DROP_T5_CAVEAT = ("SD3 without its T5 encoder (text_encoder_3=None): about 9 GB less to load, but prompts are "
                  "followed less closely, long prompts and text in images most of all.")


@contextmanager
def _bitsandbytes_without_gpu():
    """Loading with bitsandbytes where no GPU is present (the CPU). diffusers' bitsandbytes quantizers refuse it in
    their validate_environment (`RuntimeError: No GPU found. A GPU is needed for quantization.`), though bitsandbytes
    has CPU kernels for 4- and 8-bit (measured: FACTS.md). Workaround, narrowly: while loading, that one error of that
    one method is ignored; anything else it raises still raises. (diffusers 0.42.1)"""
    from diffusers.quantizers.bitsandbytes import bnb_quantizer

    classes = (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer)
    originals = {cls: cls.__dict__["validate_environment"] for cls in classes}

    def lifted(original):
        def validate_environment(self, *args, **kwargs):
            try:
                return original(self, *args, **kwargs)
            except RuntimeError as e:
                if "No GPU found" not in str(e):
                    raise
        return validate_environment

    for cls, original in originals.items():
        cls.validate_environment = lifted(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.validate_environment = original


def quantization_config(quantization: str, components, dtype):
    """diffusers' PipelineQuantizationConfig for bitsandbytes `quantization` ("4bit": nf4 with double quant,
    computing in `dtype`; "8bit": LLM.int8) of the pipeline's `components`."""
    from diffusers.quantizers import PipelineQuantizationConfig

    if quantization == "4bit":
        return PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit", components_to_quantize=list(components),
            quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                          "bnb_4bit_compute_dtype": dtype})
    return PipelineQuantizationConfig(quant_backend="bitsandbytes_8bit", quant_kwargs={"load_in_8bit": True},
                                      components_to_quantize=list(components))


def _check_bitsandbytes(quantization: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError(f"quantization={quantization!r} needs bitsandbytes (Colab does not have it): "
                          "pip install bitsandbytes") from e


def _route(resolved, base, gguf_info, quantization, route, dtype, profile) -> memory.Route:
    """The Route to load by: the one asked for, else the planner's on CUDA, else the device itself."""
    if isinstance(route, memory.Route):
        return route
    wanted = "none" if quantization == "auto" and profile.device != "cuda" else quantization
    plan_name = _plan_name(base)
    if route is None and plan_name is not None and profile.device == "cuda":  # said before a download, not after
        # a GGUF transformer is planned as its base model at the file's precision (Q8 as 8-bit, Q2-Q6 as 4-bit)
        asked = gguf_info.precision if gguf_info and quantization == "auto" else quantization
        return _planned(lambda: memory.sd_route(plan_name, str(dtype).split(".")[-1], profile, asked), plan_name,
                        memory.Route(name="gpu", quantization="none" if wanted == "auto" else wanted))
    return memory.Route(name=route or ("gpu" if profile.device == "cuda" else profile.device),
                        quantization="none" if wanted == "auto" else wanted)


def load_sd(name: str = "sd15", task: str = "txt2img", dtype=None, profile: runtime.Profile | None = None,
            quantization: str = "auto", route=None, drop_t5: bool = False, fast: bool | None = None,
            compile: bool = False, step_cache: bool = False):
    """A diffusers pipeline for `task` ("txt2img", "img2img" or "inpaint") from a catalogue name or alias, a hub id,
    a folder, a one-file `.safetensors` checkpoint or a FLUX `.gguf` transformer file (its other parts come from its
    base model, helpers.gguf), in the runtime's dtype, on its device. SDXL from the hub in fp16 gets the fp16-fix VAE
    (the stock one overflows to black); a one-file SDXL keeps its own VAE, which diffusers decodes in fp32
    (force_upcast), so that no hub call is made. An inpainting file loads for "inpaint" only.

    quantization: "auto" (the planner's choice on CUDA: 4-bit for SD3 and FLUX on a T4; "none" on CPU), "4bit"
    (bitsandbytes nf4, double quant, computing in the runtime dtype), "8bit" or "none"; it applies to the denoiser and
    the T5 encoder (QUANTIZED_PARTS) or to the parts the planner names, on any device bitsandbytes runs on, the CPU
    included. route: None (planned: memory.sd_route on CUDA), a memory.Route, or a route name: "gpu",
    "model_offload", "staged" (the text encoders load, encode and are freed before the denoiser runs: helpers.staged;
    FLUX and SD3), or the CPU device. drop_t5: SD3 without its T5 encoder (less memory, weaker prompt following).
    fast: the fast path (helpers.fast: channels_last, fused QKV; the same image within fp rounding), default on CUDA
    only; with it, compile=True adds torch.compile of the denoiser and step_cache=True (FLUX, SD3) a first-block
    step cache, which changes the image.
    The pipeline records `_helpers_model_name` (the file's stem, or the catalogue name), `_helpers_model_file`
    (main_weights_file) for the PNG metadata, and `_helpers_route` (the Route it was loaded by)."""
    if task not in SD_PIPELINES:
        raise ValueError(f"`task` must be one of {', '.join(SD_PIPELINES)}, not {task!r}.")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"`quantization` must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}.")
    if fast is False and (compile or step_cache):
        raise ValueError("`compile` and `step_cache` are part of the fast path, and fast=False: pass fast=True (or "
                         "leave it out) with them.")
    if route is not None and not isinstance(route, memory.Route) and route not in memory.ROUTES + ("cpu", "mps"):
        raise ValueError(f"`route` must be one of {', '.join(memory.ROUTES)}, the CPU device or a memory.Route, not "
                         f"{route!r}.")
    from . import models

    if models.is_link(name):   # a Civitai, Hugging Face or direct link: the file, downloaded once (models.py)
        name = str(models.download(name, kind="checkpoint"))
    resolved = registry.resolve(name, task=task, quantized=quantization in ("4bit", "8bit"))
    if resolved.family == "llava_next":
        raise ValueError(f"{name!r} is a LLaVA model: load it with load_llava({name!r}).")
    import diffusers
    from safetensors import SafetensorError
    import torch

    from . import gguf, one_file, staged

    gguf_info = gguf.inspect(resolved.source) if resolved.gguf else None
    # a GGUF file is a transformer only: the rest of the pipeline comes from the model it was made from
    base = registry.resolve(gguf_info.base, task=task) if gguf_info else resolved
    if drop_t5 and base.family != "sd3":
        raise ValueError(f"`drop_t5` is for SD3 (its T5 encoder is optional); {name!r} is {base.family}.")
    if resolved.single_file:  # refused before anything is planned or loaded
        info = one_file.inspect(resolved.source)
        one_file.check_task(info, task)
        one_file.config_folder(info)
    profile = profile or runtime.detect_profile()
    dtype = dtype or runtime.pick_dtype(profile)
    plan = _route(resolved, base, gguf_info, quantization, route, dtype, profile)
    parts = tuple(plan.quantized or QUANTIZED_PARTS.get(base.family, ())) if plan.quantization != "none" else ()
    parts = tuple(p for p in parts if not (drop_t5 and p == T5_ENCODERS.get("sd3"))
                  and not (gguf_info and p == "transformer"))
    if plan.name == "staged" and base.family not in staged.FAMILIES:
        raise ValueError(f"The staged route is for {', '.join(staged.FAMILIES)} models; {name!r} is {base.family}: "
                         "load it with route='gpu' or 'model_offload'.")
    if resolved.single_file and (parts or plan.name == "staged"):
        raise ValueError(f"{name!r} is a one-file checkpoint, which loads unquantized on the gpu or model_offload "
                         f"route only (asked: {plan.quantization}, {plan.name}): pass quantization='none', or load "
                         "its diffusers folder or catalogue name.")
    if parts:
        _check_bitsandbytes(plan.quantization)
    source, revision = base.source, base.revision
    spec = base.spec
    prequantized = bool(plan.quantization == "4bit" and parts and not base.tiny and spec and spec.prequantized_4bit)
    if prequantized:  # its parts are nf4 already: no 16-bit weights to download, nor to hold in RAM while quantizing
        source, revision = spec.prequantized_4bit, None
        print(f"{spec.name} in 4-bit: loading the pre-quantized {source} (a smaller download).")
    kwargs = {"dtype": dtype, "use_safetensors": True}
    if revision:
        kwargs["revision"] = revision
    if not base.tiny and spec and spec.fp16_variant and dtype == torch.float16 and not prequantized:
        kwargs["variant"] = "fp16"
    if drop_t5:
        print(DROP_T5_CAVEAT)
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    encoder, applied = None, parts
    if plan.name == "staged":
        texts = [p for p in parts if p.startswith("text_encoder")]
        parts = tuple(p for p in parts if not p.startswith("text_encoder"))
        text_kwargs = {k: v for k, v in kwargs.items() if k in ("variant", "text_encoder_3", "tokenizer_3")}
        if texts and not prequantized:
            text_kwargs["quantization_config"] = quantization_config(plan.quantization, texts, dtype)
        encoder = staged.StagedEncoder(source, base.family, dtype, profile.device, revision, text_kwargs)
        kwargs.update({te: None for te in staged.TEXT_ENCODERS[base.family]})
    if parts and not prequantized:
        kwargs["quantization_config"] = quantization_config(plan.quantization, parts, dtype)
    if profile.device != "cuda" and (parts or prequantized):
        kwargs["device_map"] = profile.device  # else diffusers' bitsandbytes loader asks torch.cuda for a device
    try:
        with _bitsandbytes_without_gpu():
            if gguf_info:
                kwargs["transformer"] = gguf.load_transformer(gguf_info, base.source, dtype, base.revision)
            if resolved.single_file:
                pipe = one_file.load(resolved.source, task=task, dtype=dtype)
            else:
                if base.family == "sdxl" and dtype == torch.float16 and not base.tiny:
                    kwargs["vae"] = diffusers.AutoencoderKL.from_pretrained(registry.SDXL_FP16_VAE, dtype=dtype,
                                                                            use_safetensors=True)
                pipe = getattr(diffusers, SD_PIPELINES[task]).from_pretrained(source, **kwargs)
    except (OSError, SafetensorError) as e:  # not found, gated, or a damaged weights file
        if isinstance(e, one_file.CheckpointFileError) or resolved.single_file:
            raise
        raise _load_error(dataclasses.replace(base, source=source, revision=revision), e) from e
    # what the PNG parameters call it (A1111: the file's stem, or the catalogue name) and the file its hash is of
    pipe._helpers_model_name = (Path(resolved.source).stem if resolved.single_file or gguf_info
                                else resolved.spec.name if resolved.spec is not None else name)
    pipe._helpers_model_file = resolved.source if gguf_info else main_weights_file(resolved, kwargs.get("variant"))
    pipe._helpers_route = memory.Route(plan.name, plan.quantization if applied else "none", applied, plan.vram_gib,
                                       plan.ram_gib)
    if spec and spec.max_sequence_length:
        pipe._helpers_max_sequence_length = spec.max_sequence_length
    if encoder is not None:
        encoder.attach(pipe)
    if plan.name == "staged":
        print(f"{name}, staged: the text encoders load for each new prompt and are freed before the denoiser runs"
              + (" (which moves to the GPU while it runs: model CPU offload)." if profile.device == "cuda" else "."))
    if plan.name == "model_offload" or (plan.name == "staged" and profile.device == "cuda"):
        if plan.name == "model_offload":
            print(f"{name} does not fit this GPU whole: each part moves to it while it runs (model CPU offload).")
        pipe.enable_model_cpu_offload()
    elif "device_map" not in kwargs:
        pipe.to(profile.device)
    if profile.device == "cuda" and profile.vram_gb < 16:
        pipe.vae.enable_slicing()  # decode a batch one image at a time: the same images, a lower peak
    if fast if fast is not None else (profile.device == "cuda" or compile or step_cache):
        from .fast import speed_up

        speed_up(pipe, compile=compile, step_cache=step_cache)
    return pipe


def choose_quantization(resolved, profile: runtime.Profile) -> str:
    """"none" where the 16-bit weights, KV cache and activations fit in VRAM (helpers.planner), else "4bit" (nf4: on
    a T4 that is every LLaVA; bitsandbytes' 8-bit is slower than nf4, so it is never the automatic choice). Always
    "none" on CPU and for the tiny models."""
    if profile.device != "cuda" or resolved.tiny:
        return "none"
    return _planned(lambda: memory.choose_quantization(_plan_name(resolved), profile), resolved.source, "none")


def load_llava(name: str = "llava-1.6-mistral-7b", quantization: str = "auto", profile: runtime.Profile | None = None,
               adapter: str | None = None):
    """(model, processor) of a LLaVA 1.6 checkpoint. quantization: "auto", "4bit" (nf4, double quant, compute in the
    runtime dtype), "8bit" or "none". On a GPU the weights go straight to it (device_map), never through a full copy
    in RAM. adapter: a LoRA adapter fine-tuned on it (notebook 09, helpers.training.llava: a folder or a hub id, peft's
    format, safetensors only), loaded on top."""
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
    if adapter:
        from .training.llava import load_adapter

        model = load_adapter(model, adapter)
    return model, processor
