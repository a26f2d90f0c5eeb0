"""The staged route of a FLUX or SD3 pipeline: its text encoders load, encode the prompt, and are freed before the
denoiser runs, so that the two never hold memory at the same time (how a 4-bit FLUX fits a free Colab's 12.7 GB of
RAM: FACTS.md). The pipeline is loaded without text encoders; a StagedEncoder takes the place of its `encode_prompt`,
so `pipe(prompt=...)` and `generate(pipe, ...)` work as on any pipeline. The embeddings of the last prompts are kept:
the same prompt again (a batch, batch_count > 1, a seed sweep) is not encoded again; a new prompt loads the encoders
again (or, with `keep=True`, they stay loaded between prompts).
"""
import gc

FAMILIES = ("flux", "sd3")
PIPELINES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}
TEXT_ENCODERS = {"flux": ("text_encoder", "text_encoder_2"),
                 "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3")}


class StagedEncoder:
    """Encodes prompts with the text encoders of `source`, loaded only while they encode.

    source/revision: the model (hub id or folder); family: "flux" or "sd3"; dtype: the runtime dtype; device: where
    the encoders run; load_kwargs: more from_pretrained arguments (quantization_config for the T5,
    text_encoder_3=None for SD3 without T5...); keep: leave the encoders loaded between prompts."""

    def __init__(self, source: str, family: str, dtype, device: str, revision: str | None = None,
                 load_kwargs: dict | None = None, keep: bool = False):
        if family not in FAMILIES:
            raise ValueError(f"The staged route is for {', '.join(FAMILIES)} pipelines, not {family!r}.")
        self.source, self.family, self.dtype, self.device = source, family, dtype, device
        self.revision, self.load_kwargs, self.keep = revision, dict(load_kwargs or {}), keep
        self.loads = 0          # how many times the encoders were loaded (the tests count it)
        self._pipe = None
        self._cache = {}        # the arguments of the last prompts -> their embeddings, for one image each

    def _text_pipe(self):
        """The pipeline with its text encoders and tokenizers only (no transformer, no VAE)."""
        if self._pipe is None:
            import diffusers

            from .loading import _bitsandbytes_without_gpu

            kwargs = {"transformer": None, "vae": None, "dtype": self.dtype, "use_safetensors": True,
                      "device_map": self.device, **self.load_kwargs}
            if self.revision:
                kwargs["revision"] = self.revision
            with _bitsandbytes_without_gpu():
                self._pipe = getattr(diffusers, PIPELINES[self.family]).from_pretrained(self.source, **kwargs)
            self.loads += 1
        return self._pipe

    def free(self) -> None:
        """Drop the loaded text encoders (the kept embeddings stay)."""
        self._pipe = None
        gc.collect()
        from . import oom

        oom.empty_cache()

    def encode_prompt(self, *args, device=None, num_images_per_prompt: int = 1, lora_scale=None, **kwargs):
        """What the pipeline's own encode_prompt returns, for the same arguments (it is called in its place)."""
        import torch

        if args or any(kwargs.get(k) is not None for k in kwargs if k.endswith("_embeds")):
            raise ValueError("A pipeline on the staged route encodes its prompts itself: pass `prompt` (and "
                             "`negative_prompt`), not embeddings or positional arguments.")
        key = repr(sorted(kwargs.items()))
        if key not in self._cache:
            with torch.no_grad():
                out = self._text_pipe().encode_prompt(**kwargs, device=self.device, num_images_per_prompt=1)
            if not self.keep:
                self.free()
            self._cache = {key: out}  # the last prompt only: a new one replaces it
        out = self._cache[key]

        def expand(i, t):  # one copy per image, as the pipeline's own encode_prompt makes them
            if t is None:
                return None
            if self.family == "flux" and i == 2:  # FLUX's text_ids have no batch axis
                return t.to(device or t.device)
            return t.repeat_interleave(num_images_per_prompt, dim=0).to(device or t.device)

        return tuple(expand(i, t) for i, t in enumerate(out))

    def attach(self, pipe) -> None:
        """Make `pipe` (a pipeline without text encoders, or one made from it with from_pipe) encode through this."""
        pipe._helpers_encoder = self
        pipe.encode_prompt = self.encode_prompt


def attached(pipe) -> bool:
    """Whether `pipe` is on the staged route."""
    return getattr(pipe, "_helpers_encoder", None) is not None
