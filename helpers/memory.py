"""What fits where, checked before loading: the questions load_sd and load_llava ask, answered by helpers.planner
(exact parameter counts from the real architectures, bytes by precision, activations, RAM while loading). A model
name here is anything the planner takes: a catalogue name or alias, a hub id, a local folder or a .safetensors file
(planner.model)."""
from dataclasses import dataclass

from . import planner, runtime

ROUTES = ("gpu", "model_offload", "staged")  # and the CPU device ("cpu", "mps") where there is no CUDA GPU


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


def sd_placement(model_name: str, precision: str, profile: runtime.Profile) -> str:
    """Where the weights of diffusion pipeline `model_name` go on `profile`: "gpu" (all on the GPU), "model_offload"
    (each model moves to the GPU while it runs: slower, but needs VRAM for the largest part only) or the CPU device.
    Raises ValueError, with the figures, where neither fits (the GPU, or the system RAM that loading and offload
    need)."""
    if profile.device != "cuda":
        return profile.device
    p = planner.plan(model_name, profile, dtype=precision)
    if p.verdict == "fits":
        return "gpu"
    if p.verdict == "fits with offload":
        return "model_offload"
    weights = sum(planner.weights(model_name, precision).values()) / runtime.GB
    ram = f"{profile.ram_gb:.1f} GiB of RAM" if profile.ram_gb else "the RAM"
    fix = (f"with 4-bit nf4 of its {' and '.join(p.quantized)} it would fit (`python -m helpers plan {model_name}`); "
           "load_sd does not quantize yet, so use a smaller model or a larger GPU" if p.verdict == "fits with 4-bit"
           else "use a smaller model, or a GPU (or RAM) of at least "
                f"{weights + planner.CUDA_OVERHEAD_GIB + planner.RAM_BASE_GIB:.0f} GiB")
    raise ValueError(f"{model_name} in {precision} needs about {weights:.1f} GiB of weights: more than the "
                     f"{_gpu(profile)}, and too much to offload to {ram}: {fix}.")


def sd_route(model_name: str, precision: str, profile: runtime.Profile, quantization: str = "auto") -> Route:
    """The Route for diffusion pipeline `model_name` on `profile` (see Route). Raises ValueError with the figures
    where nothing fits. (First version: the placement of sd_placement, no quantization.)"""
    return Route(name=sd_placement(model_name, precision, profile))
