"""The fast path of a diffusion pipeline: what makes the same call paint faster, on by default on CUDA.

    speed_up(pipe)                     channels_last UNet/VAE memory layout, fused QKV projections
    speed_up(pipe, compile=True)       and torch.compile of the denoiser (its repeated blocks where it has them:
                                       a warm-up of tens of seconds on the first image, said once)
    speed_up(pipe, step_cache=True)    and, for FLUX and SD3, a first-block step cache (diffusers' cache hooks):
                                       steps whose first block barely changes reuse the last output; faster, and
                                       NOT the same image (a quality trade, said when it is switched on)

SDPA attention is torch's default already. Without compile and the cache the image is the plain call's within fp
rounding (tests/test_fast.py); quantized (bitsandbytes) parts are left unfused. Fused QKV projections bypass a
LoRA on to_q/to_k/to_v, so loading a LoRA undoes the fusion first (unfuse, helpers.lora).
"""
STEP_CACHE_THRESHOLD = 0.2   # FirstBlockCacheConfig's threshold: diffusers' documented example value for FLUX
STEP_CACHE_CAVEAT = ("Step cache on: steps whose first block changes less than {:.0%} reuse the last output. Faster, "
                     "but the image is not the one the full steps paint (details drift); switch it off for final "
                     "images and comparisons.")


def _quantized(module) -> bool:
    return bool(getattr(module, "is_loaded_in_4bit", False) or getattr(module, "is_loaded_in_8bit", False)
                or getattr(module, "is_quantized", False))


def speed_up(pipe, compile: bool = False, step_cache: bool = False) -> list[str]:
    """Apply the fast path to `pipe` in place; returns what was done, in words (also stored as
    `pipe._helpers_fast`)."""
    import torch

    done = []
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    for name in ("unet", "vae"):
        module = getattr(pipe, name, None)
        if module is not None and not _quantized(module):
            module.to(memory_format=torch.channels_last)
            done.append(f"channels_last {name}")
    fusable = [m for m in (denoiser, getattr(pipe, "vae", None))
               if m is not None and hasattr(m, "fuse_qkv_projections") and not _quantized(m)]
    for module in fusable:
        module.fuse_qkv_projections()
    if fusable:
        done.append("fused QKV")
    if step_cache:
        if getattr(pipe, "transformer", None) is None:
            raise ValueError("`step_cache` is for FLUX and SD3 (transformer denoisers, diffusers' cache hooks); this "
                             f"{type(pipe).__name__} has a UNet: leave it off.")
        from diffusers import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=STEP_CACHE_THRESHOLD))
        print(STEP_CACHE_CAVEAT.format(STEP_CACHE_THRESHOLD))
        done.append("step cache")
    if compile:
        if hasattr(denoiser, "compile_repeated_blocks") and getattr(denoiser, "_repeated_blocks", None):
            denoiser.compile_repeated_blocks(fullgraph=True)   # regional: each block type compiled once
            done.append("compiled repeated blocks")
        else:
            denoiser.compile()
            done.append("compiled denoiser")
        print("torch.compile: the first image takes longer (compiling, tens of seconds on a GPU); later ones are "
              "faster.")
    pipe._helpers_fast = done
    return done


def unfuse(pipe) -> bool:
    """Undo the fused QKV projections of `pipe` (a LoRA on to_q/to_k/to_v is bypassed by them: diffusers' fused
    processors call to_qkv). Returns whether there was anything to undo."""
    done = getattr(pipe, "_helpers_fast", None)
    if not done or "fused QKV" not in done:
        return False
    for name in ("unet", "transformer", "vae"):
        module = getattr(pipe, name, None)
        if module is not None and hasattr(module, "unfuse_qkv_projections"):
            module.unfuse_qkv_projections()
    done.remove("fused QKV")
    return True
