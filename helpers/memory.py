"""What fits where: the weight memory of a model in a given quantization, checked against a GPU before loading.

(The benchmark issue extends this into the full planner: exact parameter counts, activations by resolution, RAM.)
"""
from . import runtime

# Bytes per parameter of the whole model, as loaded. 4-bit nf4 stores half a byte per quantised weight, but the
# vision tower, embeddings, norms and lm_head stay in 16 bit: about 0.6 bytes a parameter overall for LLaVA 7B, which
# matches the 4.3-4.9 GB published for LLaVA 1.6 7B in nf4 (FACTS.md). 8-bit keeps the same parts in 16 bit too.
BYTES_PER_PARAM = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "8bit": 1.1, "4bit": 0.6}
ACTIVATION_HEADROOM_GIB = 1.5   # KV cache of a few thousand tokens, CUDA context, fragmentation


def weights_gib(params_b: float, precision: str) -> float:
    """GiB of weights for `params_b` billion parameters at `precision` ("4bit", "8bit" or a dtype name)."""
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"Unknown precision {precision!r}; known: {', '.join(BYTES_PER_PARAM)}.")
    return params_b * 1e9 * BYTES_PER_PARAM[precision] / runtime.GB


def check_fits(model_name: str, params_b: float, precision: str, profile: runtime.Profile) -> None:
    """Raise ValueError, with the figures and the fix, where the weights of `model_name` at `precision` plus some
    headroom do not fit the GPU of `profile`. Says nothing on CPU (RAM is the limit there, and it is slow, not fatal)."""
    if profile.device != "cuda":
        return
    need = weights_gib(params_b, precision) + ACTIVATION_HEADROOM_GIB
    if need <= profile.vram_gb:
        return
    smaller = [p for p in ("8bit", "4bit") if weights_gib(params_b, p) + ACTIVATION_HEADROOM_GIB <= profile.vram_gb]
    fix = (f"use quantization={smaller[-1]!r}" if smaller and precision != smaller[-1]
           else "use a smaller model or a GPU with more memory")
    raise ValueError(f"{model_name} in {precision} needs about {weights_gib(params_b, precision):.1f} GiB of weights "
                     f"+ {ACTIVATION_HEADROOM_GIB} GiB of headroom = {need:.1f} GiB, more than the "
                     f"{profile.vram_gb:.1f} GiB of this {profile.gpu_name}: {fix}.")


def sd_placement(model_name: str, params_b: float, precision: str, profile: runtime.Profile) -> str:
    """Where a diffusion pipeline's weights go on `profile`: "gpu" (all on the GPU), "model_offload" (each model moves
    to the GPU while it runs: slower, but needs VRAM for the largest part only) or "cpu". Raises ValueError, with the
    figures, where neither the GPU nor system RAM can hold them."""
    if profile.device != "cuda":
        return profile.device
    need = weights_gib(params_b, precision)
    if need + ACTIVATION_HEADROOM_GIB <= profile.vram_gb:
        return "gpu"
    if profile.ram_gb and need + 2 > profile.ram_gb:  # offload keeps every weight in RAM, plus Python and CUDA
        raise ValueError(f"{model_name} in {precision} needs about {need:.1f} GiB of weights: more than the "
                         f"{profile.vram_gb:.1f} GiB of this {profile.gpu_name}, and too much to offload to "
                         f"{profile.ram_gb:.1f} GiB of RAM. Use a smaller model, or a GPU (or RAM) of at least "
                         f"{need + ACTIVATION_HEADROOM_GIB:.0f} GiB.")
    return "model_offload"
