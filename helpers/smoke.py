"""SMOKE MODE: the tiny switch, and the one place where the work a notebook asks for is capped.

With `HELPERS_TINY=1` in the environment (or after `helpers.use_tiny()`), every registry name resolves to a tiny
random-weight model of its family (helpers.tiny). Those models prove that the code path runs, end to end, on a CPU in
seconds; what they produce is noise. So that a notebook written for a T4 also finishes in seconds in this mode, its
requests go through `cap(...)`, which lowers them to the limits below and says so. Outside SMOKE MODE `cap` returns
the value untouched.
"""
import os

ENV = "HELPERS_TINY"

# The caps of SMOKE MODE, by the name of what they limit.
LIMITS = {
    "steps": 4,            # denoising steps per image
    "size": 64,            # longest image side in pixels (the tiny VAEs downscale by 2: 64 px -> 32 latent)
    "images": 2,           # images per prompt, batch count, images captioned
    "max_new_tokens": 16,  # tokens LLaVA generates per answer
    "train_steps": 10,     # optimisation steps of a training run
}

NOISE_NOTICE = "tiny random-weight models: outputs are noise, they only prove the code path runs"


def is_tiny() -> bool:
    """True in SMOKE MODE (HELPERS_TINY=1)."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def use_tiny(on: bool = True) -> None:
    """Switch SMOKE MODE on (or off). It is an environment variable, so subprocesses and kernels inherit it."""
    os.environ[ENV] = "1" if on else "0"


def cap(name: str, value):
    """`value` lowered to the SMOKE MODE limit for `name` (with a printed notice); `value` itself otherwise."""
    if name not in LIMITS:
        raise ValueError(f"Unknown smoke limit {name!r}; known: {', '.join(LIMITS)}.")
    limit = LIMITS[name]
    if not is_tiny() or value <= limit:
        return value
    print(f"SMOKE MODE: {name} {value} -> {limit} ({NOISE_NOTICE}).")
    return limit


def cap_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) scaled down so the longer side is at most LIMITS['size'], kept multiples of 8, in SMOKE MODE."""
    limit = LIMITS["size"]
    if not is_tiny() or max(width, height) <= limit:
        return width, height
    scale = limit / max(width, height)
    w, h = (max(8, int(round(v * scale / 8)) * 8) for v in (width, height))
    print(f"SMOKE MODE: size {width}x{height} -> {w}x{h} ({NOISE_NOTICE}).")
    return w, h
