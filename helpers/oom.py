"""The out-of-memory ladder: what generation tries, rung by rung, when the GPU runs out of memory; and the message a
training run stops with.

`Ladder.step_down(error)` is called with the error a pipeline call raised. Out of memory, it empties the CUDA cache,
takes the next rung that applies and says so in one line: fewer images per batch (one at a time: the same seeds give
the same images), VAE slicing + tiling, model CPU offload (on CUDA only), a lower resolution (the image comes out
smaller than asked). The caller then runs the same call again. With no rung left it raises a RuntimeError that lists
what was tried and what to do. Any other error is raised as it was.

Training has no ladder (a smaller batch or rank changes the run): `training_oom_error(error, config)` is the error to
raise instead, naming what to lower and what to turn on.
"""
from pathlib import Path

LOWER_RESOLUTION = 0.75    # the last rung: each side times this, rounded to a multiple of 8
MIN_SIDE = 8                # pipelines take multiples of 8


class OutOfMemoryStop(RuntimeError):
    """Out of memory with nothing left to try: the message lists what was tried and what to do (a CLI can print it
    as one line, without a traceback)."""


def is_oom(error: BaseException) -> bool:
    """Whether `error` is an out-of-memory error (torch.OutOfMemoryError, or a RuntimeError that says so: MPS, XPU)."""
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(error, oom_type) or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def empty_cache() -> None:
    """Free what the failed attempt left in the GPU's cache (garbage first: its tensors may still be referenced)."""
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)


def _on_cuda(pipe) -> bool:
    device = getattr(pipe, "device", None)
    return getattr(device, "type", str(device)) == "cuda"


def _smaller(size: tuple[int, int]) -> tuple[int, int]:
    return tuple(max(MIN_SIDE, int(v * LOWER_RESOLUTION) // 8 * 8) for v in size)


class Ladder:
    """The rungs still to try for one `generate` call. `call` is the keyword arguments of the pipeline call (the
    lower-resolution rung changes its width and height, or for img2img its image); `per_batch` the images per call;
    `size` (width, height) the size asked for."""

    def __init__(self, pipe, call: dict, per_batch: int, size: tuple[int, int]):
        self.pipe, self.call, self.per_batch, self.size = pipe, call, per_batch, tuple(size)
        self.tried: list[str] = []
        self._rungs = [self._one_at_a_time, self._vae_slicing, self._offload, self._lower_resolution]

    def step_down(self, error: BaseException) -> None:
        """After `error`: the next rung applied, with its message; or the error raised (not out of memory), or a
        RuntimeError (no rung left)."""
        if not is_oom(error):
            raise error
        empty_cache()
        while self._rungs:
            message = self._rungs.pop(0)()
            if message:
                print(f"Out of GPU memory: {message}")
                return
        tried = "; ".join(self.tried) or "nothing (no rung applies to this pipeline)"
        raise OutOfMemoryStop(
            f"Out of GPU memory while generating, even after trying: {tried}. What to do: free other models first "
            "(del pipe; gc.collect(); torch.cuda.empty_cache()) or restart the runtime; ask for a smaller width and "
            "height (SD 1.5: 512x512, SDXL: 1024x1024 or less) and fewer images per batch; or use a smaller model. "
            "See TROUBLESHOOTING.md#oom-generation") from error

    def _one_at_a_time(self) -> str | None:
        if self.per_batch <= 1:
            return None
        self.tried.append(f"one image at a time instead of {self.per_batch}")
        self.per_batch = 1
        return "trying again one image at a time (the same seeds give the same images)."

    def _vae_slicing(self) -> str | None:
        vae = getattr(self.pipe, "vae", None)
        if vae is None or not hasattr(vae, "enable_tiling"):
            return None
        vae.enable_slicing()
        vae.enable_tiling()
        self.tried.append("VAE slicing + tiling")
        return "trying again with VAE slicing and tiling (the image is decoded in pieces)."

    def _offload(self) -> str | None:
        if not _on_cuda(self.pipe):  # diffusers' offload needs an accelerator
            return None
        self.pipe.enable_model_cpu_offload()
        self.tried.append("model CPU offload")
        return ("trying again with model CPU offload (each model moves to the GPU only while it runs: slower; it "
                "stays on for this pipeline).")

    def _lower_resolution(self) -> str | None:
        smaller = _smaller(self.size)
        if smaller == self.size:
            return None
        old = self.size
        self.size = smaller
        if "width" in self.call:
            self.call["width"], self.call["height"] = smaller
        elif "image" in self.call:  # img2img: the pipeline paints at the size of its image
            self.call["image"] = self.call["image"].resize(smaller)
        self.tried.append(f"{smaller[0]}x{smaller[1]} instead of {old[0]}x{old[1]}")
        return (f"trying again at {smaller[0]}x{smaller[1]}: the image will be SMALLER than the {old[0]}x{old[1]} "
                "asked for.")


def training_oom_error(error: BaseException, config, last_checkpoint=None) -> OutOfMemoryStop:
    """The error a training run stops with when it runs out of GPU memory: what to lower, what to turn on (only what
    is off), and that the last checkpoint is kept. `config` is the run's TrainConfig; `last_checkpoint` the folder of
    the latest checkpoint (default: the newest checkpoint-N in config.run_dir)."""
    if last_checkpoint is None:
        found = sorted(Path(config.run_dir).glob("checkpoint-*"),
                       key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)
        last_checkpoint = found[-1] if found else None
    lower = []
    if config.batch_size > 1:
        lower.append(f"batch_size {config.batch_size} -> 1 (with gradient_accumulation_steps "
                     f"{config.batch_size * config.gradient_accumulation_steps} for the same effective batch)")
    if config.resolution > 512:
        lower.append(f"resolution {config.resolution} -> 512")
    elif config.resolution > 256:
        lower.append(f"resolution {config.resolution} -> {config.resolution - 128}")
    if config.rank > 4:
        lower.append(f"rank {config.rank} -> {max(4, config.rank // 2)}")
    turn_on = []
    if not config.gradient_checkpointing:
        turn_on.append("gradient_checkpointing=True")
    if config.optimizer == "adamw":
        turn_on.append("optimizer='adamw8bit' (8-bit Adam: a quarter of Adam's memory)")
    if not config.cache_latents:
        turn_on.append("cache_latents=True (the VAE encodes each image once, not at every step; needs flip_p=0)")
    if getattr(config, "train_text_encoder", False):
        turn_on.append("train_text_encoder=False (train the UNet only)")
    kept = (f"The last checkpoint, {last_checkpoint}, is kept: run again and it resumes from there (a new rank or "
            "optimizer changes what a checkpoint holds: start those in a new run folder)." if last_checkpoint
            else "No checkpoint was written yet: the run starts again from step 0.")
    parts = [f"Out of GPU memory while training ({type(error).__name__}: {str(error).splitlines()[0][:160]})."]
    if lower:
        parts.append("Lower: " + "; ".join(lower) + ".")
    if turn_on:
        parts.append("Turn on: " + "; ".join(turn_on) + ".")
    if not lower and not turn_on:
        parts.append("These settings are already the smallest: use a GPU with more memory, or free other models "
                     "first (restart the runtime).")
    parts += [kept, "See TROUBLESHOOTING.md#oom-training"]
    return OutOfMemoryStop(" ".join(parts))
