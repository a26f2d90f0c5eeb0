"""The training loop, on accelerate: a LoRA (or DoRA) on the UNet of an SD 1.x or SDXL model, or the whole UNet (a
full DreamBooth fine-tune), resumable after a disconnect, on one GPU or several.

Every `checkpoint_every` steps the whole state is saved (see checkpoints.py); run `train_lora` again with the same run
folder and it goes on from the latest checkpoint: its data order and random draws are those of the uninterrupted run,
so it ends with the same weights. Under `accelerate launch` (or `launch()`, notebook_launcher) each process trains on
its own share of every epoch's batches (BucketBatchSampler's num_replicas/rank), gradients are averaged by DDP, and
only the main process writes the loss log, samples and exports.
"""
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .. import images as imaging
from .. import smoke, storage
from .checkpoints import (check_resumable, checkpoint_bytes, checkpoints, run_id, save_checkpoint, save_trained_only,
                          saved_losses, start_run, strangers)
from .config import METHODS, TARGETS, TrainConfig  # noqa: F401 (TrainConfig stays importable from here)
from .losses import TextCache, append_loss, plot_losses, prefetch_plotting, read_losses, write_losses
from .losses import loss as _loss

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
FAMILY_OF_PIPELINE = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}
# the settings that shape the trained weights: a run resumes only with the same ones
SHAPING_FIELDS = ("base_model", "method", "use_dora", "rank", "alpha", "targets", "train_text_encoder")
RANK_DUMP_ENV = "HELPERS_RANK_DUMP"   # tests: a folder where every process writes its trained weights at the end


def ensure_class_images(pipe, class_prompt: str, count: int, folder: Path, resolution: int, seed: int) -> Path:
    """`count` images of `class_prompt` by the base model in `folder` (seeds seed, seed+1, ...). Those there already
    are kept, so a second run (or a resumed one) generates only what is missing."""
    from .. import diffusion

    folder.mkdir(parents=True, exist_ok=True)
    have = len(imaging.list_images(folder))
    count = smoke.cap("images", count)
    for i in range(have, count):
        print(f"class image {i + 1} of {count}: {class_prompt!r}")
        diffusion.generate(pipe, class_prompt, width=resolution, height=resolution, seed=seed + i,
                           progress=False).save(folder)
    return folder


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float]
    lora_path: Path | None            # the LoRA in the diffusers format (method "lora")
    resumed_from: int | None
    family: str = "sd15"
    model_dir: Path | None = None     # method "full": the trained pipeline as a diffusers folder
    single_file: Path | None = None   # method "full": one A1111/ComfyUI checkpoint (None where it could not be made)

    @property
    def output(self) -> Path:
        """What the run made: the LoRA file, or the model folder of a full fine-tune."""
        return self.model_dir if self.model_dir is not None else self.lora_path


def check_full_fits(model: str, family: str, profile, optimizer: str = "auto", resolution: int | None = None,
                    batch_size: int = 1) -> None:
    """Refuse a full fine-tune that the memory planner (planner.training_bytes: fp32 UNet, its gradients, the
    optimizer states, the frozen parts in 16 bit, activations with checkpointing) says does not fit the GPU. A model
    outside the catalogue is planned as its family's base model (same architecture). On CPU nothing is refused."""
    from .. import planner, registry

    if profile.device != "cuda":
        return
    eight_bit = optimizer in ("auto", "adamw8bit")
    name = model if model in registry.MODELS else family
    need = planner.training_bytes(name, "adamw8bit" if eight_bit else "adamw", resolution, batch_size) / planner.GIB
    if need > profile.vram_gb:
        hint = "use optimizer='adamw8bit' or 'auto', or " if not eight_bit else ""
        raise ValueError(f"A full fine-tune of {model} needs about {need:.1f} GiB of GPU memory (fp32 UNet, its "
                         f"gradients, {'8-bit ' if eight_bit else ''}AdamW states) but {profile.gpu_name} has "
                         f"{profile.vram_gb:.1f} GiB: {hint}set method='lora' (LoRA-DreamBooth fits), or use a GPU "
                         f"with at least {need + 1:.0f} GiB.")


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold `run_dir/.lock` (an flock) while a run trains, so that a second training of the same run folder (another
    cell, another shell) stops at once instead of mixing its checkpoints into this one's. Taken by the main process
    only (RANK 0: accelerate sets RANK in each process it launches); where the file system has no locks (some FUSE
    mounts), the run goes on unlocked."""
    import errno
    import fcntl

    if os.environ.get("RANK", "0") != "0":
        yield
        return
    path = Path(run_dir) / ".lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        # held open for reading only: a file open for writing would keep the mount from turning read-only, as Drive
        # does in a hiccup, and flock needs no write access
        handle = open(path)   # noqa: SIM115 (held for the whole run)
    except OSError:   # an unwritable run folder: start_run says so in one line
        handle = None
    with handle or contextlib.nullcontext():
        locked = False
        if handle is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    raise ValueError(f"Another training is running in {str(run_dir)!r} ({holder}): wait for it to "
                                     "end or stop it; two at once would mix their checkpoints. To train something "
                                     "else, use another run folder (RUN_NAME).") from None
                # else: no locks on this file system; the run goes on unlocked
        if locked:
            with contextlib.suppress(OSError):
                path.write_text(f"process {os.getpid()}\n")
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def train_lora(config: TrainConfig, stop_after: int | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume) a LoRA on the UNet (or, with method='full', the whole UNet). `stop_after`: stop once that
    many steps are done (without the final export), as a disconnect would; the next call resumes. Under
    `accelerate launch` with several processes, call it in every process (the CLI does). One training at a time
    per run folder (run_lock)."""
    with run_lock(Path(config.run_dir)):
        return _train_lora(config, stop_after, progress)


def _train_lora(config: TrainConfig, stop_after: int | None, progress: bool) -> TrainResult:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    from .. import loading, registry, runtime
    from . import datasets

    run_dir = Path(config.run_dir)
    max_steps = smoke.cap("train_steps", config.max_train_steps)
    resolution = smoke.cap("size", config.resolution)
    shaping = {name: getattr(config, name) for name in SHAPING_FIELDS}
    if checkpoints(run_dir):   # before any model is loaded
        done, latest = checkpoints(run_dir)[-1]
        check_resumable(latest, shaping)
        if done > max_steps:
            raise ValueError(f"`max_train_steps` is {max_steps}, but the run in {str(run_dir)!r} has already trained "
                             f"{done} steps ({latest.name}): ask for more than {done} steps to go on, or use a new "
                             "run folder (RUN_NAME) to train from the start.")
    profile = runtime.detect_profile()
    base_model = _local_model(config.base_model)
    if registry.resolve(base_model).family == "sd2":   # generation loads it; training does not know its layout yet
        raise ValueError(f"{config.base_model!r} is an SD 2.x checkpoint: the kit paints with SD 2.x but trains "
                         "LoRAs and DreamBooth models on SD 1.x and SDXL only (their A1111/kohya metadata and "
                         "layouts are the ones it writes). Train on an SD 1.5 or SDXL checkpoint.")
    if config.method == "full":   # before a model of several GB is loaded
        check_full_fits(base_model, registry.resolve(base_model).family, profile, config.optimizer,
                        resolution, config.batch_size)
    precision = _mixed_precision(config.mixed_precision, profile)
    # SDXL's first text encoder gives its penultimate layer: the LoRA on its last layer gets no gradient, which DDP
    # must be told about
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.train_text_encoder)
    # cpu=True where there is no GPU: several processes then run DDP over gloo (accelerate picks MULTI_CPU only so)
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                              mixed_precision=precision, kwargs_handlers=[ddp], cpu=profile.device == "cpu")
    main = accelerator.is_main_process
    if main:
        start_run(run_dir)   # the run's identity (checkpoints.py): made before the first checkpoint, read by all
        if strangers(run_dir):
            print(f"{len(strangers(run_dir))} checkpoint(s) in {strangers(run_dir)[0].parent} belong to another run "
                  f"of this folder (one deleted to start over): not resumed; delete them to free the space.")
    accelerator.wait_for_everyone()
    shaping_and_id = {**shaping, "run_id": run_id(run_dir)}
    set_seed(config.seed, device_specific=True)  # process i: seed + i (each draws its own noise; rank 0 as alone)
    # the frozen weights in half precision where training runs in it; the trained weights stay in fp32
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)

    # fast=False: the fast path's fused QKV projections bypass to_q/to_k/to_v, so the LoRA on them would get no
    # gradient (on CUDA, where the fast path is on by default)
    if main:
        prefetch_plotting()   # loss.png's matplotlib, imported while the model loads (losses.py)
    pipe = loading.load_sd(base_model, dtype=weight_dtype, profile=profile, fast=False)
    pipe.to(accelerator.device)
    family = FAMILY_OF_PIPELINE.get(type(pipe).__name__)
    if family is None:
        raise ValueError(f"train_lora trains SD 1.x and SDXL models; {config.base_model!r} gives "
                         f"{type(pipe).__name__}: pick an sd15 or sdxl model.")
    unet, vae = pipe.unet, pipe.vae
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    class_dataset = None
    if config.class_prompt:  # made by the base model, before training, by the main process alone
        class_dir = run_dir / "class_images"
        if main:
            ensure_class_images(pipe, config.class_prompt, config.num_class_images, class_dir, resolution,
                                config.seed)
        accelerator.wait_for_everyone()
        class_items = [datasets.Item(path=p, caption=config.class_prompt, repeats=1, concept=None)
                       for p in imaging.list_images(class_dir)]
        class_dataset = datasets.TrainingDataset(class_items, resolution, bucketing=False, seed=config.seed + 1)
    for model in (unet, vae, *text_encoders):
        model.requires_grad_(False)
    trained = [unet] + (text_encoders if config.train_text_encoder else [])
    if config.method == "full":
        if unet.dtype != torch.float32:
            unet.to(torch.float32)   # fp32 master weights; mixed precision runs the forward in 16 bit
        unet.requires_grad_(True)
    else:
        _add_adapters(config, unet, text_encoders)
        cast_training_params(trained, dtype=torch.float32)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    rates = [config.learning_rate] + [config.text_encoder_lr or config.learning_rate] * config.train_text_encoder
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": rates[0]}]
    if config.train_text_encoder:
        groups.append({"params": [p for te in text_encoders for p in te.parameters() if p.requires_grad],
                       "lr": rates[1]})
    params = [p for group in groups for p in group["params"]]
    optimizer = _optimizer(config.optimizer, groups, config.learning_rate, profile)

    items = datasets.find_items(config.dataset, trigger=config.trigger)
    dataset = datasets.TrainingDataset(items, resolution, trigger=config.trigger,
                                       caption_dropout=config.caption_dropout, shuffle_captions=config.shuffle_captions,
                                       flip_p=config.flip_p, seed=config.seed, bucketing=class_dataset is None)
    sampler = datasets.BucketBatchSampler(dataset, config.batch_size, seed=config.seed,
                                          num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    # not accelerator.prepare'd: the sampler shards itself, so a resume skips exactly the batches trained. Its own
    # generator: each new iterator draws a seed, which must not come from (and shift) the global RNG that the
    # training noise uses, or a resumed run would draw other noise than the uninterrupted one
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=datasets.collate_examples,
                                         generator=torch.Generator().manual_seed(config.seed))
    # once prepared, it is stepped num_processes times per optimizer step (accelerate's convention for a loader
    # whose batches it shards) and not at all between accumulated micro-batches: count in those units
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    if config.method != "full":   # checkpoints hold the adapters, never the frozen base (checkpoints.py)
        save_trained_only(accelerator)
    if main:
        print(f"Each checkpoint: about {storage.size_text(checkpoint_bytes(params, config.optimizer))} (trained "
              f"weights and optimizer state), {config.keep_checkpoints} kept.")
    *prepared, optimizer, lr_scheduler = accelerator.prepare(*trained, optimizer, lr_scheduler)
    unet = prepared[0]
    encoders = prepared[1:] if config.train_text_encoder else text_encoders
    for model in prepared:
        model.train()
    text_cache = None if config.train_text_encoder else TextCache()   # frozen encoders: each caption once
    latents = _cache_latents(vae, [dataset] + ([class_dataset] if class_dataset else []), config.seed,
                             accelerator.device) if config.cache_latents else None
    step, resumed_from = 0, None
    if checkpoints(run_dir):
        resumed_from, latest = checkpoints(run_dir)[-1]
        accelerator.load_state(str(latest))
        step = resumed_from
        if main:
            where = " (on this machine's disk: the local fallback)" if latest.parent != run_dir else ""
            print(f"Resuming from {latest}{where} (step {step} of {max_steps}).")
        # load_state brings back the learning rates the run started with: a rate lowered after a NaN loss (the
        # usual fix) must win, or the resumed run blows up again
        changed = _set_base_learning_rates(lr_scheduler, rates)
        if changed and main:
            print(f"The learning rate changed since the checkpoint ({changed}): the run goes on with the new one.")
    kept = saved_losses(latest) if resumed_from else None
    if kept is not None and main:
        write_losses(run_dir, kept)   # the checkpoint's own losses: the log may lag behind it, or be gone
    losses = (kept if kept is not None else read_losses(run_dir, step)) if main else []
    log_behind = False
    seen = []   # (step, image paths) of this process: the debugging record of RANK_DUMP_ENV
    updates_per_epoch = max(1, len(sampler) // config.gradient_accumulation_steps)
    bar = tqdm(total=max_steps, initial=step, desc="training", unit="step", disable=not (progress and main))

    with _explained_oom(config, run_dir):
        while step < max_steps and (stop_after is None or step < stop_after):
            epoch, done_in_epoch = divmod(step, updates_per_epoch)
            sampler.set_epoch(epoch)
            skip = done_in_epoch * config.gradient_accumulation_steps
            for i, batch in enumerate(loader):
                if i < skip:  # already trained on before the checkpoint this run resumed from
                    continue
                if config.instance_prompt:
                    batch["captions"] = [config.instance_prompt] * len(batch["captions"])
                seen.append((step + 1, list(batch["paths"])))
                if class_dataset is not None:  # the class examples of this batch: fixed by the step, so resumable
                    n = len(batch["captions"])
                    first = (i * accelerator.num_processes + accelerator.process_index) * n
                    prior = datasets.collate_examples([class_dataset[(first + j) % len(class_dataset)]
                                                       for j in range(n)])
                    batch = {key: torch.cat([value, prior[key]]) if key == "pixel_values" else value + prior[key]
                             for key, value in batch.items()}
                if latents is not None:
                    batch["latents"] = torch.stack([latents[path] for path in batch["paths"]])
                with accelerator.accumulate(*prepared):
                    loss = _loss(batch, unet, vae, encoders, tokenizers, noise_scheduler, config, accelerator.device,
                                 prior=class_dataset is not None, text_cache=text_cache)
                    mean_loss = accelerator.reduce(loss.detach().clone(), "mean").item()  # over the processes
                    if not torch.isfinite(torch.tensor(mean_loss)):
                        raise _nan_error(f"The loss became {mean_loss} at step {step + 1}", run_dir, lr_scheduler,
                                         main, bad_step=step)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                step += 1
                losses.append(mean_loss)
                if main:
                    log_behind = not append_loss(run_dir, step, mean_loss) or log_behind
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                if step % config.checkpoint_every == 0 or step == max_steps:
                    # a step can blow the weights up while its loss was still finite: such weights never become a
                    # checkpoint, so the last one stays good to resume from
                    if not all(torch.isfinite(p).all() for p in params):
                        raise _nan_error(f"The trained weights became NaN or infinite at step {step}", run_dir,
                                         lr_scheduler, main)
                    save_checkpoint(accelerator, run_dir, step, config.keep_checkpoints, shaping_and_id, losses)
                    if log_behind:
                        log_behind = not write_losses(run_dir, losses)
                if config.sample_every and (step % config.sample_every == 0 or step == max_steps) and main:
                    _samples(pipe, accelerator, config, resolution, run_dir / "samples" / f"step-{step:06d}")
                if step >= max_steps or (stop_after is not None and step >= stop_after):
                    break
    bar.close()

    result = TrainResult(run_dir=run_dir, steps=step, losses=losses, lora_path=None, resumed_from=resumed_from,
                         family=family)
    if os.environ.get(RANK_DUMP_ENV):
        _dump_rank(accelerator, unet, encoders, config, Path(os.environ[RANK_DUMP_ENV]), seen)
    if config.method == "lora":
        result.lora_path = run_dir / "lora" / "pytorch_lora_weights.safetensors"
    else:
        result.model_dir = run_dir / "model"
    if step >= max_steps:
        if main:
            if config.method == "lora":   # where Drive failed, the local fallback: the path says where it went
                result.lora_path = _export_lora(accelerator, unet, encoders, config, family, run_dir, step,
                                                resolution)
            else:
                result.single_file = _export_full(accelerator, pipe, unet, config, family, run_dir, step,
                                                  weight_dtype)
            plot_losses(run_dir, losses)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def launch(config: TrainConfig, num_processes: int | None = None, progress: bool = True) -> TrainResult:
    """Train `config` in `num_processes` processes (default: one per GPU; Kaggle's 2x T4: 2) from a notebook cell,
    with accelerate's notebook_launcher, and return the result read back from the run folder.

    notebook_launcher forks the kernel, which CUDA forbids once this kernel has touched the GPU (h.setup() does, to
    report it); then the same run goes through `accelerate launch --multi_gpu ... -m helpers train-lora CONFIG` in a
    subprocess instead, which needs no clean kernel. Either way every process runs train_lora."""
    import torch
    from accelerate import notebook_launcher

    num_processes = num_processes or max(1, torch.cuda.device_count())
    if num_processes > 1 and _cuda_initialized():
        _launch_subprocess(config, num_processes)
    else:
        notebook_launcher(train_lora, args=(config, None, progress), num_processes=num_processes)
    return read_result(config)


def _cuda_initialized() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _launch_subprocess(config: TrainConfig, num_processes: int) -> None:
    import subprocess
    import sys

    from .config import write_config

    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    path = write_config(config, Path(config.run_dir) / "config.json")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "helpers", "train-lora", str(path)]
    print("running:", " ".join(command[1:]))
    done = subprocess.run(command, check=False)
    if done.returncode:
        raise RuntimeError(f"The {num_processes}-process training exited with code {done.returncode} (its output is "
                           f"above). Run it again to resume, or train in one process: train_lora(config).")


def read_result(config: TrainConfig) -> TrainResult:
    """The TrainResult of the run in config.run_dir as its files tell it (after a run in other processes)."""
    run_dir = Path(config.run_dir)
    done = checkpoints(run_dir)
    steps = done[-1][0] if done else 0
    from .. import registry

    family = registry.resolve(_local_model(config.base_model)).family
    result = TrainResult(run_dir=run_dir, steps=steps, losses=read_losses(run_dir, steps, rewrite=False),
                         lora_path=None, resumed_from=None, family=family)
    if config.method == "lora":
        result.lora_path = run_dir / "lora" / "pytorch_lora_weights.safetensors"
    else:
        result.model_dir = run_dir / "model"
        name = _output_name(config, run_dir)
        result.single_file = run_dir / f"{name}.safetensors" if (run_dir / f"{name}.safetensors").is_file() else None
    return result


def _local_model(base_model: str) -> str:
    """`base_model`, or where it is a link the file it downloads to (once: helpers.models reuses it)."""
    from .. import models

    return str(models.download(base_model, kind="checkpoint")) if models.is_link(base_model) else base_model


def _model_hashes(base_model: str) -> dict:
    """kohya's hashes of the base model where it is a file (a downloaded link too): `ss_sd_model_hash`, the old A1111
    hash (models.legacy_hash), and `ss_new_sd_model_hash`, the file's SHA256. None for a hub model or a folder."""
    from .. import models

    path = Path(_local_model(base_model)) if models.is_link(base_model) else Path(base_model)
    if not path.is_file():
        return {}
    return {"ss_sd_model_hash": models.legacy_hash(path), "ss_new_sd_model_hash": models.file_hash(path)}


def _model_label(base_model: str) -> str:
    """The base model as kohya's `ss_sd_model_name` names it: a file's name (not its folders), else the catalogue
    name or hub id as given."""
    from .. import models

    if models.is_link(base_model) or Path(base_model).suffix.lower() == ".safetensors":
        return Path(base_model.split("?")[0]).name
    return base_model


def _output_name(config: TrainConfig, run_dir: Path) -> str:
    """The name of the A1111 file a run exports: its trigger word, else its folder's name, as a safe file name (a
    trigger such as `../x` or `sks:dog` never leaves the run folder nor breaks on Windows)."""
    from .. import paths

    return paths.safe_file_name(config.trigger or run_dir.name, default="lora")


def _add_adapters(config: TrainConfig, unet, text_encoders) -> None:
    """The LoRA (or DoRA) adapters: on the UNet's `targets`, and on the text encoders' attention if asked for."""
    from peft import LoraConfig

    from .. import runtime

    runtime.ignore_old_torchao()   # Colab's torchao 0.10 makes peft refuse every adapter (runtime.py)

    def lora(targets):
        return LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                          target_modules=targets, use_dora=config.use_dora)

    unet.add_adapter(lora(TARGETS[config.targets]))
    if config.train_text_encoder:
        for encoder in text_encoders:
            encoder.add_adapter(lora(TEXT_ENCODER_TARGETS))


def _lora_state_dicts(accelerator, unet, encoders, config) -> tuple[dict, list]:
    """The peft state dicts of the UNet and (when trained) of each text encoder."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(accelerator.unwrap_model(unet))
    te_states = ([get_peft_model_state_dict(accelerator.unwrap_model(te)) for te in encoders]
                 if config.train_text_encoder else [])
    return state, te_states


def _export_lora(accelerator, unet, encoders, config, family, run_dir: Path, step: int, resolution: int) -> Path:
    """The LoRA in the diffusers format (run_dir/lora/pytorch_lora_weights.safetensors) and the kohya/A1111 one
    (run_dir/lora/<trigger or run name>.safetensors). Returns the diffusers file (in the fallback where Drive
    failed)."""
    from . import export

    state, te_states = _lora_state_dicts(accelerator, unet, encoders, config)
    te_states += [None] * (2 - len(te_states))
    path = export.save_lora_diffusers(run_dir / "lora", state, *te_states, family=family, alpha=config.alpha)
    if config.use_dora:
        print(f"DoRA: the LoRA is saved in the diffusers format only, with no kohya/A1111 file. {export.DORA_KOHYA}")
        return path
    name = _output_name(config, run_dir)
    export.save_lora_kohya(run_dir / "lora" / f"{name}.safetensors", state, *te_states, family=family,
                           alpha=config.alpha, steps=step, base_model=_model_label(config.base_model),
                           trigger_word=config.trigger or "", output_name=name, resolution=resolution,
                           metadata=_model_hashes(config.base_model))
    return path


def _export_full(accelerator, pipe, unet, config, family, run_dir: Path, step: int, weight_dtype) -> Path | None:
    """The fine-tuned pipeline as a diffusers folder (run_dir/model, safetensors, the UNet in the run's 16-bit dtype
    on a GPU) and as one A1111/ComfyUI checkpoint (run_dir/<trigger or run name>.safetensors)."""
    pipe.unet = accelerator.unwrap_model(unet)
    if pipe.unet.dtype != weight_dtype:
        pipe.unet.to(weight_dtype)   # half the size on Drive; the single file is fp16 anyway
    pipe.unet.disable_gradient_checkpointing()
    # on a full disk the last checkpoint is whole, and a rerun exports without training
    target = storage.write_folder(run_dir / "model", lambda folder: pipe.save_pretrained(folder, safe_serialization=True),
                                  "the fine-tuned model")
    try:
        from .single_file import save_single_file
    except ImportError as e:  # written by another part of issue 5; the diffusers folder is complete without it
        print(f"No A1111 single-file checkpoint ({e}): the diffusers folder {target} holds the model.")
        return None
    name = _output_name(config, run_dir)
    metadata = {"ss_steps": str(step), "ss_sd_model_name": _model_label(config.base_model), "modelspec.title": name,
                **_model_hashes(config.base_model)}
    return save_single_file(pipe, run_dir / f"{name}.safetensors", half=True, metadata=metadata)


def _dump_rank(accelerator, unet, encoders, config, folder: Path, seen) -> None:
    """Tests: this process's trained weights and the images it trained on, as rank-<i>.safetensors / .json."""
    import safetensors.torch

    folder.mkdir(parents=True, exist_ok=True)
    if config.method == "lora":
        unet_state, te_states = _lora_state_dicts(accelerator, unet, encoders, config)
        state = {f"unet.{k}": v for k, v in unet_state.items()}
        for i, te_state in enumerate(te_states):
            state.update({f"text_encoder_{i}.{k}": v for k, v in te_state.items()})
    else:
        state = accelerator.unwrap_model(unet).state_dict()
    rank = accelerator.process_index
    safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                                str(folder / f"rank-{rank}.safetensors"))
    (folder / f"rank-{rank}.json").write_text(json.dumps({"num_processes": accelerator.num_processes, "seen": seen}))


def _cache_latents(vae, datasets_, seed: int, device) -> dict:
    """{image path: its VAE latents}, each image encoded once (a fixed draw from the latent distribution)."""
    import torch
    from tqdm.auto import tqdm

    cache = {}
    generator = torch.Generator().manual_seed(seed)
    for dataset in datasets_:
        firsts = {}
        for index, item in enumerate(dataset.entries):
            firsts.setdefault(str(item.path), index)
        for path, index in tqdm(firsts.items(), desc="caching latents", unit="image", leave=False):
            pixels = dataset[index]["pixel_values"][None].to(device, dtype=vae.dtype)
            with torch.no_grad():
                distribution = vae.encode(pixels).latent_dist
                noise = torch.randn(distribution.mean.shape, generator=generator).to(device, distribution.mean.dtype)
                cache[path] = (distribution.mean + distribution.std * noise)[0].cpu() * vae.config.scaling_factor
    return cache


def _mixed_precision(choice: str, profile) -> str:
    """auto: fp16 on GPUs without native bf16 (T4), bf16 from Ampere on, none on CPU."""
    if choice != "auto":
        if choice != "no" and profile.device != "cuda":
            raise ValueError(f"mixed_precision={choice!r} needs a CUDA GPU; on {profile.device} use 'no' (or 'auto').")
        return choice
    if profile.device != "cuda":
        return "no"
    return "bf16" if profile.native_bf16 else "fp16"


@contextlib.contextmanager
def _explained_oom(config, run_dir: Path):
    """Out of GPU memory while training: stop with what to lower and what to turn on (helpers.oom), keeping the
    last checkpoint."""
    from .. import oom

    try:
        yield
    except Exception as e:
        if not oom.is_oom(e):
            raise
        latest = checkpoints(run_dir)[-1][1] if checkpoints(run_dir) else None
        raise oom.training_oom_error(e, config, latest) from e


def _nan_error(what: str, run_dir: Path, lr_scheduler, main: bool, bad_step: int | None = None) -> FloatingPointError:
    """The error a run stops with when its loss or weights are no longer finite. `bad_step`: the step whose weights
    gave the NaN loss; a checkpoint of that step holds them, so it is set aside (renamed, not deleted) and the resume
    starts from the one before."""
    found = checkpoints(run_dir)
    aside = ""
    if bad_step is not None and found and found[-1][0] == bad_step:
        folder = found.pop()[1]
        if main:
            folder.rename(folder.with_name(f"{folder.name}-nan"))
        aside = f" Checkpoint {bad_step} holds the weights that gave it: set aside as {folder.name}-nan."
    latest = found[-1][1] if found else None
    return FloatingPointError(
        f"{what} (learning rate {lr_scheduler.get_last_lr()[0]:g}).{aside} To go on, lower `learning_rate` (e.g. "
        f"by 10x) and run again: it resumes from {latest or 'the start'}, the last good checkpoint, with the new "
        "rate. See TROUBLESHOOTING.md#nan-loss")


def _set_base_learning_rates(lr_scheduler, rates: list[float]) -> str:
    """Give a restored schedule (a LambdaLR, as diffusers' get_scheduler makes them) the base learning rates of the
    config; returns "old -> new" where they differed, else ""."""
    schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)   # accelerate wraps it
    old = list(schedule.base_lrs)
    if old == rates:
        return ""
    schedule.base_lrs = list(rates)
    for group, base, factor in zip(schedule.optimizer.param_groups, rates, schedule.lr_lambdas):
        group["initial_lr"], group["lr"] = base, base * factor(schedule.last_epoch)
    return ", ".join(f"{a:g} -> {b:g}" for a, b in zip(old, rates))


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


def _samples(pipe, accelerator, config, resolution: int, folder: Path) -> None:
    """Sample images at fixed prompts and seeds, so that runs and steps can be compared (main process only)."""
    from .. import diffusion

    pipe.unet.eval()
    with accelerator.autocast():
        for i, prompt in enumerate(config.sample_prompts):
            result = diffusion.generate(pipe, prompt, num_inference_steps=config.sample_steps, width=resolution,
                                        height=resolution, seed=config.sample_seed + i, progress=False)
            result.save(folder)
    pipe.unet.train()
