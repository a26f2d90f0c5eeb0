"""The training objective: prompts to text embeddings (SD 1.x: one CLIP; SDXL: two, plus the pooled embedding and the
size/crop time ids), the noise-prediction loss with noise offset, min-SNR and prior preservation, and the loss log.

SDXL follows diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py: the penultimate hidden states of
both text encoders, concatenated; the pooled (projected) output of the second; and per example the time ids
(original height, width, crop top, left, target height, width) that the UNet takes as `added_cond_kwargs`.
"""
import csv
import math
from pathlib import Path


def encode_prompts(captions: list[str], text_encoders, tokenizers, device):
    """(encoder_hidden_states, pooled or None) of `captions`. One text encoder: SD 1.x (its last hidden state). Two:
    SDXL (penultimate hidden states of both, concatenated; the pooled output of the second)."""
    import torch

    if len(text_encoders) == 1:
        ids = tokenizers[0](captions, padding="max_length", max_length=tokenizers[0].model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
        return text_encoders[0](ids)[0], None
    states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), pooled


class TextCache:
    """The text embeddings of each caption, computed once where the text encoders are frozen: diffusers'
    `--pre_compute_text_embeddings`, done lazily (a caption is encoded the first time a batch holds it), so shuffled
    or dropped captions still work. At most `limit` captions are kept (then it starts again)."""

    def __init__(self, limit: int = 512):
        self.limit, self.store, self.encoded = limit, {}, 0

    def encode(self, captions: list[str], text_encoders, tokenizers, device):
        import torch

        missing = [c for c in dict.fromkeys(captions) if c not in self.store]
        if missing:
            if len(self.store) + len(missing) > self.limit:
                self.store.clear()
                missing = list(dict.fromkeys(captions))
            with torch.no_grad():
                hidden, pooled = encode_prompts(missing, text_encoders, tokenizers, device)
            self.encoded += len(missing)
            for i, caption in enumerate(missing):
                self.store[caption] = (hidden[i], None if pooled is None else pooled[i])
        rows = [self.store[c] for c in captions]
        return (torch.stack([h for h, _ in rows]),
                None if rows[0][1] is None else torch.stack([p for _, p in rows]))


def time_ids(batch, device, dtype):
    """SDXL's micro-conditioning, one row per example: original (height, width), crop (top, left) and the target
    (height, width), which is the example's bucket."""
    import torch

    rows = [[*original, *crop, bucket[1], bucket[0]] for original, crop, bucket in
            zip(batch["original_sizes"], batch["crop_top_lefts"], batch["buckets"])]
    return torch.tensor(rows, device=device, dtype=dtype)


def snr(scheduler, timesteps):
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas_cumprod / (1 - alphas_cumprod)


def loss(batch, unet, vae, text_encoders, tokenizers, noise_scheduler, config, device, prior: bool = False,
         text_cache: TextCache | None = None):
    """The noise-prediction loss of one batch (epsilon or v-prediction, as the model was trained), with noise
    offset and min-SNR weighting when asked for. With `prior`, the second half of the batch holds class images:
    their loss, times prior_loss_weight, is added (DreamBooth's prior preservation). Two text encoders: SDXL.
    `text_cache`: frozen text encoders' embeddings, each caption encoded once (TextCache)."""
    import torch
    import torch.nn.functional as F

    if "latents" in batch:  # cached: encoded once, before training
        latents = batch["latents"].to(device)
    else:
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device, dtype=vae.dtype)
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
    if text_cache is not None and not config.train_text_encoder:
        encoder_hidden_states, pooled = text_cache.encode(batch["captions"], text_encoders, tokenizers, device)
    else:
        with torch.set_grad_enabled(config.train_text_encoder):
            encoder_hidden_states, pooled = encode_prompts(batch["captions"], text_encoders, tokenizers, device)
    noise = torch.randn_like(latents)
    if config.noise_offset:
        noise += config.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    extra = {}
    if pooled is not None:
        extra["added_cond_kwargs"] = {"text_embeds": pooled,
                                      "time_ids": time_ids(batch, device, encoder_hidden_states.dtype)}
    prediction = unet(noisy, timesteps, encoder_hidden_states, **extra).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if config.min_snr_gamma:
        ratio = snr(noise_scheduler, timesteps)
        weights = torch.clamp(ratio, max=config.min_snr_gamma) / ratio
        if noise_scheduler.config.prediction_type == "v_prediction":
            weights = weights * ratio / (ratio + 1)
        per_example = per_example * weights
    if not prior:
        return per_example.mean()
    instance, class_part = per_example.chunk(2)
    return instance.mean() + config.prior_loss_weight * class_part.mean()


# ---------------------------------------------------------------------------------------------------- the loss log

def read_losses(run_dir: Path, step: int, rewrite: bool = True) -> list[float]:
    """The logged losses of the steps a resumed run keeps; with `rewrite`, rows past its checkpoint are dropped from
    the file too (the main process does that; the others only read)."""
    path = Path(run_dir) / "loss.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
    kept = [value for s, value in rows if s <= step]
    if rewrite:
        write_losses(run_dir, kept)
    return kept


def _rows(values, first: int = 1) -> str:
    return "".join(f"{step},{value:.6f}\n" if math.isfinite(value) else f"{step},{value}\n"
                   for step, value in enumerate(values, first))


def write_losses(run_dir: Path, values: list[float]) -> bool:
    """loss.csv made anew from `values` (steps 1..n), atomically. The log is a view of the run (the checkpoints
    hold the losses too): where it cannot be written, say so and return False; training goes on."""
    from .. import storage

    try:
        with storage.atomic_open(Path(run_dir) / "loss.csv", "w") as f:
            f.write("step,loss\n" + _rows(values))
        return True
    except OSError as e:
        print(f"Could not write {Path(run_dir) / 'loss.csv'} ({e}); the losses are kept with the checkpoints, and the "
              "log is written again with the next one.")
        return False


def append_loss(run_dir: Path, step: int, value: float) -> bool:
    """One row of loss.csv, tried again after a failed write (a Drive hiccup) and made again where the run folder
    was deleted. Where it keeps failing, False (the caller rewrites the log with write_losses later)."""
    import time

    from .. import storage

    path = Path(run_dir) / "loss.csv"
    for delay in (*storage.WRITE_RETRY_DELAYS_S, None):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.is_file()
            with path.open("a", newline="") as f:
                f.write(("step,loss\n" if new else "") + _rows([value], step))
            return True
        except OSError as e:
            if delay is None:
                print(f"Could not add step {step} to {path} ({e}); training goes on, and the log is written again "
                      "with the next checkpoint.")
                return False
            time.sleep(delay)
    return False


def prefetch_plotting() -> None:
    """Import matplotlib in a background thread (about 0.5 s, most of a short run's fixed cost) while the model
    loads and trains, so that loss.png at the end does not wait for it."""
    import threading

    def load():
        try:
            import matplotlib.figure  # noqa: F401
        except Exception:   # plot_losses says what went wrong, later, in the caller's thread
            pass

    threading.Thread(target=load, daemon=True, name="import-matplotlib").start()


def plot_losses(run_dir: Path, values: list[float]) -> Path:
    """loss.png in the run folder (a Figure without pyplot: a notebook's own plotting backend stays as it is)."""
    from matplotlib.figure import Figure

    from .. import storage

    figure = Figure(figsize=(6, 3))
    axes = figure.subplots()
    axes.plot(range(1, len(values) + 1), values)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    figure.tight_layout()
    def write(path):
        with storage.atomic_open(path) as f:
            figure.savefig(f, format="png")

    return storage.write_with_fallback(Path(run_dir) / "loss.png", write)
