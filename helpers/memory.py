"""What fits where, checked before loading: the questions load_sd and load_llava ask, answered by helpers.planner
(exact parameter counts from the real architectures, bytes by precision, activations, RAM while loading). A model
name here is anything the planner takes: a catalogue name or alias, a hub id, a local folder or a .safetensors file
(planner.model)."""
from dataclasses import dataclass

from . import planner, runtime

ROUTES = planner.ROUTES  # "gpu", "model_offload", "staged"; and the CPU device ("cpu", "mps") where there is no CUDA
QUANTIZATIONS = planner.QUANTIZATIONS  # "auto", "none", "4bit", "8bit"


@dataclass(frozen=True)
class Route:
    """How a diffusion pipeline is loaded and run on a profile (the planner's choice, sd_route):
    name: "gpu" (all on the GPU), "model_offload" (each model on the GPU while it runs), "staged" (the text
          encoders load, encode the prompts and are freed before the denoiser loads), or the CPU device;
    quantization: "none", "4bit" (bitsandbytes nf4, double quant, compute in the runtime dtype) or "8bit";
    quantized: the components it applies to (e.g. ("text_encoder_2", "transformer"));
    vram_gib / ram_gib: the planned peaks of the route."""
    name: str
    quantization: str = "none"
    quantized: tuple = ()
    vram_gib: float = 0.0
    ram_gib: float = 0.0


def weights_gib(model_name: str, precision: str) -> float:
    """GiB of the weights of model `model_name` at `precision` ("4bit", "8bit" or a dtype name)."""
    return planner.weights_gib(model_name, precision)


def _gpu(profile: runtime.Profile) -> str:
    return f"{profile.vram_gb:.1f} GiB of this {profile.gpu_name or 'GPU'}"


def check_fits(model_name: str, precision: str, profile: runtime.Profile) -> None:
    """Raise ValueError, with the figures and the fix, where LLaVA model `model_name` at `precision` ("4bit", "8bit"
    or a dtype name), with the KV cache of an answer about one image, does not fit the GPU of `profile`. Says nothing
    on CPU (RAM is the limit there, and it is slow, not fatal)."""
    if profile.device != "cuda":
        return
    dtype, quant = ((profile.dtype_name, precision) if precision in ("4bit", "8bit") else (precision, None))
    vram, _, w, _ = planner._llava_need(model_name, dtype, quant)
    if vram <= profile.vram_gb * runtime.GB:
        return
    weights, need = sum(w.values()) / runtime.GB, vram / runtime.GB
    smaller = [q for q in ("8bit", "4bit") if planner._llava_need(model_name, profile.dtype_name, q)[0]
               <= profile.vram_gb * runtime.GB]
    fix = (f"use quantization={smaller[-1]!r}" if smaller and precision != smaller[-1]
           else "use a smaller model or a GPU with more memory")
    raise ValueError(f"{model_name} in {precision} needs about {weights:.1f} GiB of weights + {need - weights:.1f} GiB "
                     f"of KV cache, activations and CUDA overhead = {need:.1f} GiB, more than the {_gpu(profile)}: "
                     f"{fix}.")


def choose_quantization(model_name: str, profile: runtime.Profile) -> str:
    """The planner's choice for LLaVA model `model_name` on `profile`: "none" where it fits in 16 bit, else "4bit"
    (nf4; bitsandbytes' 8-bit is slower than nf4, so it is never the automatic choice). "none" on CPU."""
    if profile.device != "cuda":
        return "none"
    return "4bit" if planner.plan(model_name, profile).quantization else "none"


def sd_placement(model_name: str, precision: str, profile: runtime.Profile, quantization: str = "auto") -> str:
    """The name of sd_route's route: "gpu", "model_offload", "staged" or the CPU device. Raises as sd_route does."""
    return sd_route(model_name, precision, profile, quantization).name


def _gib(nbytes: float) -> str:
    return f"{nbytes / runtime.GB:.2f} GiB"


def sd_route(model_name: str, precision: str, profile: runtime.Profile, quantization: str = "auto") -> Route:
    """The Route for diffusion pipeline `model_name` in `precision` (the compute dtype's name) on `profile`: the
    planner's first route that fits both the GPU and the system RAM (planner.ROUTES says the order and why: all on
    the GPU, then model offload, then staged; 16-bit before 4-bit within each), at the pipeline's native resolution.
    `quantization`: "auto" (16-bit, else 4-bit nf4 of the UNet/transformer and T5), "none" (16-bit routes only),
    "4bit" or "8bit" (that only). On a CPU the route is the device, 16-bit unless a quantization is asked for, and
    is not refused (RAM makes it slow there, and the planner's figures are in the Route). Raises ValueError with the
    figures (needed and available, VRAM and RAM, of the nearest route) where no route fits."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"`quantization` must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}.")
    p = planner.plan(model_name, profile, dtype=precision, quantization=quantization)
    if p.fits or profile.device != "cuda":
        return Route(name=p.route, quantization=p.quantization or "none", quantized=p.quantized,
                     vram_gib=round(p.vram_peak / runtime.GB, 2), ram_gib=round(p.ram_peak / runtime.GB, 2))
    kind = {"4bit": "4-bit nf4", "8bit": "8-bit"}.get(p.quantization)
    how = p.route + (f" with {kind} {' and '.join(p.quantized)}" if kind else ", 16-bit")
    has_ram = _gib(p.ram_total) if p.ram_total < float("inf") else "no limit"
    fix = ("allow 4-bit: quantization='auto' or '4bit'" if quantization != "4bit" and planner.plan(
               model_name, profile, dtype=precision, quantization="4bit").fits
           else f"use a smaller model, or a GPU of at least {_gib(p.vram_peak)} and {_gib(p.ram_peak)} of RAM")
    raise ValueError(f"{model_name} in {precision} fits no route on the {_gpu(profile)}: the nearest ({how}) "
                     f"needs {_gib(p.vram_peak)} of VRAM (has {_gib(p.vram_total)}) and {_gib(p.ram_peak)} of RAM "
                     f"(has {has_ram}): {fix}.")
