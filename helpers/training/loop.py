"""The training loop, on accelerate: a LoRA on the UNet of an SD 1.x model, resumable after a disconnect.

Every `checkpoint_every` steps the whole state (LoRA weights, optimizer, learning-rate schedule, RNG states) is saved
with `accelerator.save_state` into a temporary folder of the run, which is renamed to `checkpoint-<step>` once
complete, so a kill during a save leaves the previous checkpoint whole; the last `keep_checkpoints` are kept. Run
`train_lora` again with the same run folder and it goes on from the latest checkpoint: its data order and random
draws are those of the uninterrupted run, so it ends with the same weights.

(SDXL, text-encoder training, DreamBooth, samples during training and the notebooks come next: issue 5.)
"""
import csv
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .. import smoke

TARGETS = {"attention": ["to_k", "to_q", "to_v", "to_out.0"],
           "attention+ff": ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]}
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainConfig:
    dataset: str                      # a folder of images with kohya-style .txt captions (N_name repeat folders)
    run_dir: str                      # checkpoints, loss log and the trained LoRA go here (on Drive in Colab)
    base_model: str = "sd15"
    resolution: int = 512
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"    # diffusers.optimization names: constant, cosine, linear, constant_with_warmup ...
    lr_warmup_steps: int = 0
    rank: int = 16
    alpha: float = 16.0
    targets: str = "attention"        # or "attention+ff"
    seed: int = 42
    trigger: str | None = None
    caption_dropout: float = 0.0
    shuffle_captions: bool = False
    flip_p: float = 0.0
    noise_offset: float = 0.0         # e.g. 0.05: darker darks and brighter brights
    min_snr_gamma: float = 0.0        # e.g. 5.0: min-SNR loss weighting (0: off)
    max_grad_norm: float = 1.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    mixed_precision: str = "auto"     # auto: fp16 on a T4, bf16 from Ampere on, none on CPU; or "no", "fp16", "bf16"
    gradient_checkpointing: bool = True
    optimizer: str = "auto"           # auto: 8-bit AdamW (bitsandbytes) on a GPU, AdamW elsewhere; "adamw", "adamw8bit"
    sample_every: int = 0             # steps between sample images (0: none)
    sample_prompts: list = field(default_factory=lambda: ["a photo of sks"])
    sample_seed: int = 1234
    sample_steps: int = 20

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpoint_every",
                     "keep_checkpoints", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, not {value!r}.")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"`learning_rate` must be between 0 and 1, not {self.learning_rate!r} (1e-4 is usual "
                             "for a LoRA).")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ValueError(f"`mixed_precision` must be auto, no, fp16 or bf16, not {self.mixed_precision!r}.")
        if self.optimizer not in ("auto", "adamw", "adamw8bit"):
            raise ValueError(f"`optimizer` must be auto, adamw or adamw8bit, not {self.optimizer!r}.")
        if self.targets not in TARGETS:
            raise ValueError(f"`targets` must be one of {', '.join(TARGETS)}, not {self.targets!r}.")
        if self.resolution % 64:
            raise ValueError(f"`resolution` must be a multiple of 64, not {self.resolution}: use "
                             f"{max(64, round(self.resolution / 64) * 64)}.")


def checkpoints(run_dir) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run, oldest first, as (step, folder)."""
    run_dir = Path(run_dir)
    found = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def _save_checkpoint(accelerator, run_dir: Path, step: int, keep: int) -> Path:
    target = run_dir / f"checkpoint-{step}"
    staging = run_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    accelerator.save_state(str(staging))
    staging.rename(target)  # complete: only now does it count as a checkpoint
    for _, old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _snr(scheduler, timesteps):
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas_cumprod / (1 - alphas_cumprod)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float]
    lora_path: Path
    resumed_from: int | None


def train_lora(config: TrainConfig, stop_after: int | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume) a LoRA on the UNet. `stop_after`: stop once that many steps are done (without the final
    export), as a disconnect would; the next call resumes."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, get_peft_model_state_dict
    from tqdm.auto import tqdm

    from .. import loading, runtime
    from . import datasets, export

    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    max_steps = smoke.cap("train_steps", config.max_train_steps)
    resolution = smoke.cap("size", config.resolution)
    profile = runtime.detect_profile()
    precision = _mixed_precision(config.mixed_precision, profile)
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                              mixed_precision=precision)
    set_seed(config.seed)
    # the frozen weights in half precision where training runs in it; the trained LoRA weights stay in fp32
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)

    pipe = loading.load_sd(config.base_model, dtype=weight_dtype, profile=profile)
    if type(pipe).__name__ != "StableDiffusionPipeline":
        raise ValueError(f"train_lora trains SD 1.x models for now; {config.base_model!r} gives "
                         f"{type(pipe).__name__}.")
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                target_modules=TARGETS[config.targets]))
    cast_training_params(unet, dtype=torch.float32)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = _optimizer(config.optimizer, params, config.learning_rate, profile)

    items = datasets.find_items(config.dataset, trigger=config.trigger)
    dataset = datasets.TrainingDataset(items, resolution, trigger=config.trigger, caption_dropout=config.caption_dropout,
                                       shuffle_captions=config.shuffle_captions, flip_p=config.flip_p,
                                       seed=config.seed)
    sampler = datasets.BucketBatchSampler(dataset, config.batch_size, seed=config.seed)
    # its own generator: each new iterator draws a seed, which must not come from (and shift) the global RNG that
    # the training noise uses, or a resumed run would draw other noise than the uninterrupted one
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=datasets.collate_examples,
                                         generator=torch.Generator().manual_seed(config.seed))
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * config.gradient_accumulation_steps,
                                 num_training_steps=max_steps * config.gradient_accumulation_steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    unet.train()
    step, resumed_from = 0, None
    if checkpoints(run_dir):
        resumed_from, latest = checkpoints(run_dir)[-1]
        accelerator.load_state(str(latest))
        step = resumed_from
        print(f"Resuming from {latest} (step {step} of {max_steps}).")
    losses = _read_losses(run_dir, step)
    batches_per_epoch = len(sampler)
    updates_per_epoch = max(1, batches_per_epoch // config.gradient_accumulation_steps)
    bar = tqdm(total=max_steps, initial=step, desc="training", unit="step", disable=not progress)

    while step < max_steps and (stop_after is None or step < stop_after):
        epoch, done_in_epoch = divmod(step, updates_per_epoch)
        sampler.set_epoch(epoch)
        skip = done_in_epoch * config.gradient_accumulation_steps
        for i, batch in enumerate(loader):
            if i < skip:  # already trained on before the checkpoint this run resumed from
                continue
            with accelerator.accumulate(unet):
                loss = _loss(batch, unet, vae, text_encoder, tokenizer, noise_scheduler, config, accelerator.device)
                if not torch.isfinite(loss):
                    latest = checkpoints(run_dir)[-1][1] if checkpoints(run_dir) else None
                    raise FloatingPointError(
                        f"The loss became {loss.item()} at step {step + 1} (learning rate "
                        f"{lr_scheduler.get_last_lr()[0]:g}): lower `learning_rate` (e.g. by 10x) and run again; it "
                        f"resumes from {latest or 'the start'}, the last good checkpoint.")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            losses.append(loss.item())
            _append_loss(run_dir, step, losses[-1])
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if step % config.checkpoint_every == 0 or step == max_steps:
                _save_checkpoint(accelerator, run_dir, step, config.keep_checkpoints)
            if config.sample_every and (step % config.sample_every == 0 or step == max_steps):
                _samples(pipe, unet, accelerator, config, resolution, run_dir / "samples" / f"step-{step:06d}")
            if step >= max_steps or (stop_after is not None and step >= stop_after):
                break
    bar.close()

    lora_path = run_dir / "lora" / "pytorch_lora_weights.safetensors"
    if step >= max_steps:
        state = get_peft_model_state_dict(accelerator.unwrap_model(unet))
        lora_path = export.save_lora_diffusers(run_dir / "lora", state, family="sd15", alpha=config.alpha)
        name = config.trigger or run_dir.name
        export.save_lora_kohya(run_dir / "lora" / f"{name}.safetensors", state, family="sd15", alpha=config.alpha,
                               steps=step, base_model=config.base_model, trigger_word=config.trigger or "",
                               output_name=name, resolution=resolution)
        _plot_losses(run_dir, losses)
    return TrainResult(run_dir=run_dir, steps=step, losses=losses, lora_path=lora_path, resumed_from=resumed_from)


def _mixed_precision(choice: str, profile) -> str:
    """auto: fp16 on GPUs without native bf16 (T4), bf16 from Ampere on, none on CPU."""
    if choice != "auto":
        if choice != "no" and profile.device != "cuda":
            raise ValueError(f"mixed_precision={choice!r} needs a CUDA GPU; on {profile.device} use 'no' (or 'auto').")
        return choice
    if profile.device != "cuda":
        return "no"
    return "bf16" if profile.native_bf16 else "fp16"


def _optimizer(choice: str, params, learning_rate: float, profile):
    """8-bit AdamW (bitsandbytes) on a GPU: a quarter of AdamW's optimizer memory; plain AdamW elsewhere."""
    import torch

    if choice == "adamw8bit" or (choice == "auto" and profile.device == "cuda"):
        if profile.device != "cuda":
            raise ValueError("optimizer='adamw8bit' needs a CUDA GPU (bitsandbytes' 8-bit optimizers); use 'adamw' "
                             "or 'auto' here.")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=learning_rate)
    return torch.optim.AdamW(params, lr=learning_rate)


def _samples(pipe, unet, accelerator, config, resolution: int, folder: Path) -> None:
    """Sample images at fixed prompts and seeds, so that runs and steps can be compared."""
    from .. import diffusion

    unet.eval()
    with accelerator.autocast():
        for i, prompt in enumerate(config.sample_prompts):
            result = diffusion.generate(pipe, prompt, num_inference_steps=config.sample_steps, width=resolution,
                                        height=resolution, seed=config.sample_seed + i, progress=False)
            result.save(folder)
    unet.train()


def _loss(batch, unet, vae, text_encoder, tokenizer, noise_scheduler, config, device):
    """The noise-prediction loss of one batch (epsilon or v-prediction, as the model was trained), with noise
    offset and min-SNR weighting when asked for."""
    import torch
    import torch.nn.functional as F

    pixels = batch["pixel_values"].to(device, dtype=vae.dtype)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer(batch["captions"], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        encoder_hidden_states = text_encoder(ids)[0]
    noise = torch.randn_like(latents)
    if config.noise_offset:
        noise += config.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    if not config.min_snr_gamma:
        return F.mse_loss(prediction.float(), target.float())
    snr = _snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=config.min_snr_gamma) / snr
    if noise_scheduler.config.prediction_type == "v_prediction":
        weights = weights * snr / (snr + 1)
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_example * weights).mean()


def _read_losses(run_dir: Path, step: int) -> list[float]:
    """The logged losses of the steps a resumed run keeps (rows past its checkpoint are dropped)."""
    path = run_dir / "loss.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
    kept = [loss for s, loss in rows if s <= step]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        writer.writerows(enumerate(kept, 1))
    return kept


def _append_loss(run_dir: Path, step: int, loss: float) -> None:
    path = run_dir / "loss.csv"
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["step", "loss"])
        writer.writerow([step, f"{loss:.6f}" if math.isfinite(loss) else loss])


def _plot_losses(run_dir: Path, losses: list[float]) -> Path:
    """loss.png in the run folder (a Figure without pyplot: a notebook's own plotting backend stays as it is)."""
    from matplotlib.figure import Figure

    from .. import storage

    figure = Figure(figsize=(6, 3))
    axes = figure.subplots()
    axes.plot(range(1, len(losses) + 1), losses)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    figure.tight_layout()
    path = run_dir / "loss.png"
    with storage.atomic_open(path) as f:
        figure.savefig(f, format="png")
    return path
