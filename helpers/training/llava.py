"""QLoRA fine-tune of LLaVA 1.6 on instruction records (helpers.instruct), on one T4, resumable.

The model is LLaVA 1.6 in 4-bit nf4 computing in fp16 on a GPU (on the CPU, for tests, the same code in fp32 without
quantization); a LoRA (peft) on the language model's linear layers, the vision tower frozen, the projector trained
only if asked; gradient checkpointing; paged 8-bit AdamW on a GPU; batch 1 with gradient accumulation; accelerate.

Each sample is built with the processor itself, so its length is the real one: the image's own anyres token count
plus its text. Nothing is ever cut (a cut through the image tokens is what raises "Image features and image tokens
do not match"); `image_max_side` scales large images down first, which is the memory knob, and a sample longer than
`max_tokens` is left out and named. Labels are -100 everywhere but the assistant turns (assistant_spans).

Every `checkpoint_every` steps the adapter, optimizer, scheduler and RNG states are saved (checkpoints.py, with
save_trained_only); run train_llava again with the same run folder and it resumes, ending with the same adapter as
an uninterrupted run. A held-out split of the images gives the loss before and after. The adapter is saved in
peft's format (adapter_model.safetensors) with a small model card; load_adapter puts it on a loaded LLaVA.

This is a plain accelerate loop rather than TRL's SFTTrainer: TRL is not installed here nor on Colab, and this loop
shares the SD trainer's checkpoints (adapter-only, exact resume) and masks by the chat template's own spans.
"""
import dataclasses
import json
import random
import typing
from dataclasses import dataclass
from pathlib import Path

from .. import runtime, smoke, storage
from .checkpoints import (check_resumable, checkpoint_bytes, checkpoints, run_id, save_checkpoint, save_trained_only,
                          saved_losses, start_run)
from .config import coerce
from .losses import append_loss, plot_losses, read_losses, write_losses

IGNORE = -100   # the label of a token that is not trained on (transformers' loss skips it)
# the language model's linear layers (Mistral, Llama/Vicuna, Yi): never the vision tower's q/k/v/out_proj
LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PLANNED_TEXT_TOKENS = 512   # the text of a sample as planned before loading (a long conversation: its turns)
SHAPING_FIELDS = ("base_model", "rank", "alpha", "train_projector", "quantization")
ADAPTER_DIR = "adapter"
CONFIG_NAME = "config.json"
EVAL_NAME = "eval.json"


@dataclass
class LlavaTrainConfig:
    data: str                         # the instruction records: a .jsonl in the LLaVA-Instruct form (helpers.instruct)
    run_dir: str                      # checkpoints, loss log, eval and the adapter go here (on Drive in Colab)
    images: str | None = None         # the folder the records' image paths are relative to (None: the jsonl's)
    base_model: str = "llava-1.6-mistral-7b"
    quantization: str = "auto"        # auto: 4-bit nf4 on a GPU (QLoRA), none on CPU; or "4bit", "8bit", "none"
    max_train_steps: int = 200        # optimizer steps (each = gradient_accumulation_steps samples)
    gradient_accumulation_steps: int = 8
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"      # transformers' names: constant, linear, cosine, constant_with_warmup ...
    lr_warmup_steps: int = 10
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.05
    train_projector: bool = False     # also train the vision-language projector (a full copy of it in the adapter)
    image_max_side: int = 672         # larger images are scaled down to this first: fewer image tokens (0: as is)
    max_tokens: int = 0               # samples longer than this are left out, never cut (0: the model's context)
    eval_fraction: float = 0.1        # share of the images held out for the loss before/after
    seed: int = 42
    checkpoint_every: int = 25
    keep_checkpoints: int = 2
    mixed_precision: str = "auto"     # auto: fp16 on a T4, bf16 from Ampere on, none on CPU
    gradient_checkpointing: bool = True
    optimizer: str = "auto"           # auto: paged 8-bit AdamW on a GPU, AdamW elsewhere; "adamw", "paged_adamw8bit"
    max_grad_norm: float = 1.0

    def __post_init__(self):
        hints = typing.get_type_hints(LlavaTrainConfig)
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        for name in ("max_train_steps", "gradient_accumulation_steps", "rank", "checkpoint_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, not {getattr(self, name)!r}.")
        for name in ("lr_warmup_steps", "image_max_side", "max_tokens", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be 0 or more, not {getattr(self, name)!r}.")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"`learning_rate` must be between 0 and 1, not {self.learning_rate!r} (usual: 2e-4).")
        if not 0 <= self.eval_fraction < 1 or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"`eval_fraction` and `lora_dropout` must be from 0 to below 1, not "
                             f"{self.eval_fraction!r} and {self.lora_dropout!r}.")
        for name, allowed in (("quantization", ("auto", "4bit", "8bit", "none")),
                              ("mixed_precision", ("auto", "no", "fp16", "bf16")),
                              ("optimizer", ("auto", "adamw", "paged_adamw8bit"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {', '.join(allowed)}, not {getattr(self, name)!r}.")

    @property
    def image_folder(self) -> Path:
        return Path(self.images) if self.images else Path(self.data).parent


def write_llava_config(config: LlavaTrainConfig, path) -> Path:
    """`config` as JSON in `path` (a file, or a folder to hold config.json), atomically."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    return storage.atomic_write(path, json.dumps(dataclasses.asdict(config), indent=2) + "\n")


def read_llava_config(path, overrides: dict | None = None) -> LlavaTrainConfig:
    """The LlavaTrainConfig in a JSON file (or a run folder's config.json), `overrides` on top; relative paths in
    the file are relative to its folder. Unknown keys are named with the valid ones."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No LLaVA training config at {str(path)!r}: pass the config.json that notebook 09 "
                                "wrote into the run folder (runs/<RUN_NAME>/config.json).")
    try:
        values = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"Not a JSON config: {str(path)!r} ({e}): fix the file, or write it again with "
                         "write_llava_config().") from e
    if not isinstance(values, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object of LlavaTrainConfig fields.")  # noqa: TRY004
    values.update(overrides or {})
    valid = [f.name for f in dataclasses.fields(LlavaTrainConfig)]
    unknown = [k for k in values if k not in valid]
    if unknown:
        raise ValueError(f"Unknown LlavaTrainConfig field(s): {', '.join(map(repr, unknown))}. Valid fields: "
                         f"{', '.join(valid)}.")
    for name in ("data", "run_dir", "images"):
        if isinstance(values.get(name), str) and name not in (overrides or {}):
            given = Path(values[name]).expanduser()
            values[name] = str(given if given.is_absolute() else path.parent / given)
    return LlavaTrainConfig(**values)


# --------------------------------------------------------------------------------------------------- samples

def fit_image(image, max_side: int):
    """`image` scaled down (aspect kept) so that its longer side is at most `max_side` (0: as it is)."""
    if not max_side or max(image.size) <= max_side:
        return image
    image = image.copy()
    image.thumbnail((max_side, max_side))
    return image


def image_tokens(processor, image) -> int:
    """How many tokens the processor expands `image` into (LLaVA 1.6's anyres count for its size)."""
    ids = processor(images=image, text=processor.image_token, return_tensors="pt")["input_ids"]
    return int((ids == processor.image_token_id).sum())


def describe_budget(processor, max_side: int) -> str:
    """What `image_max_side` costs, in image tokens, for a square, a 4:3 and a 16:9 photo of 4000 px."""
    from PIL import Image

    shapes = {"square": (4000, 4000), "4:3": (4000, 3000), "16:9": (4000, 2250)}
    counts = {name: image_tokens(processor, fit_image(Image.new("RGB", size), max_side))
              for name, size in shapes.items()}
    side = f"{max_side} px" if max_side else "as they are"
    return (f"image_max_side {side}: " + ", ".join(f"a {name} photo -> {n} image tokens" for name, n in
                                                   counts.items()))


def assistant_spans(processor, messages) -> tuple[str, list[tuple[int, int]]]:
    """(the chat template's text of `messages`, the character spans of the assistant turns in it, each with what
    the template closes it with, e.g. </s>). The spans come from rendering the conversation turn by turn, so they are
    the template's own, whatever its format."""
    def render(msgs, prompt):
        return processor.apply_chat_template(msgs, add_generation_prompt=prompt, tokenize=False)

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = render(messages[:i + 1], False)
        start = None
        for prefix in (render(messages[:i], True), render(messages[:i], False)):
            if through.startswith(prefix):
                start = len(prefix)
                break
        if start is None or not text.startswith(through):
            raise ValueError("The chat template does not render a conversation as its turns one after another, so "
                             "the assistant turns cannot be found for the labels; use a checkpoint with a standard "
                             "chat template.")
        spans.append((start, len(through)))
    return text, spans


def build_example(processor, messages, image) -> dict:
    """Model inputs of one conversation with one image, and `labels`: the input ids inside the assistant turns,
    IGNORE elsewhere (prompt, image tokens, padding). Its length is the processor's own, image tokens included."""
    import torch

    text, spans = assistant_spans(processor, messages)
    token = processor.image_token
    if text.count(token) != 1:
        raise ValueError(f"A sample must hold one image, in its first question; this one holds {text.count(token)}.")
    inputs = processor(images=[image], text=text, return_tensors="pt", return_offsets_mapping=True)
    ids, offsets = inputs["input_ids"][0], inputs.pop("offset_mapping")[0].tolist()
    # the offsets are in the text with the image token expanded to its n copies: move the spans by as much
    n = int((ids == processor.image_token_id).sum())
    at, shift = text.index(token), (n - 1) * len(token)
    moved = [(a + shift, b + shift) if a > at else (a, b) for a, b in spans]
    labels = torch.full_like(ids, IGNORE)
    for i, (s, e) in enumerate(offsets):
        if e > s and ids[i] != processor.image_token_id and any(a <= s and e <= b for a, b in moved):
            labels[i] = ids[i]
    inputs["labels"] = labels[None]
    return dict(inputs)


def split_records(records, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): whole images held out (all their records), a share `eval_fraction` of the images, at
    least one where there are two images or more; the same split for the same seed."""
    images = sorted({r["image"] for r in records})
    random.Random(seed).shuffle(images)
    n = round(len(images) * eval_fraction)
    n = min(max(n, 1 if eval_fraction > 0 and len(images) > 1 else 0), max(len(images) - 1, 0))
    held = set(images[:n])
    return [r for r in records if r["image"] not in held], [r for r in records if r["image"] in held]


def record_example(processor, record, folder: Path, max_side: int) -> dict:
    from .. import images as imaging
    from .. import instruct

    image = fit_image(imaging.open_image(Path(folder) / record["image"]), max_side)
    return build_example(processor, instruct.to_messages(record)["messages"], image)


def load_records(config: LlavaTrainConfig) -> list[dict]:
    from .. import instruct

    path = Path(config.data)
    if not path.is_file():
        raise FileNotFoundError(f"No instruction records at {str(path)!r}: make them first (helpers.instruct, "
                                "`python -m helpers instruct FOLDER`), or pass the .jsonl they are in.")
    records = instruct.read_records(path)
    if not records:
        raise ValueError(f"{str(path)!r} holds no records: make some first (helpers.instruct).")
    return records


def held_out_questions(config: LlavaTrainConfig, count: int = 3) -> list[tuple[Path, str]]:
    """(image path, first question) of up to `count` held-out records (one per image; the training records where
    none is held out): the same questions for the answers before and after training."""
    train, held = split_records(load_records(config), config.eval_fraction, config.seed)
    seen, out = set(), []
    for record in held or train:
        if record["image"] not in seen and len(out) < count:
            seen.add(record["image"])
            question = record["conversations"][0]["value"].replace("<image>", "").strip()
            out.append((config.image_folder / record["image"], question))
    return out


# ------------------------------------------------------------------------------------------------------ model

def add_lora(model, config: LlavaTrainConfig):
    """`model` (a loaded LLaVA) as a peft model with a LoRA on its language model's linear layers (and a trained
    copy of the projector if asked); everything else frozen."""
    from peft import LoraConfig, get_peft_model

    runtime.ignore_old_torchao()   # Colab's torchao 0.10 makes peft refuse every adapter (runtime.py)

    model.requires_grad_(False)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout,
                      target_modules=LM_TARGETS,
                      modules_to_save=["multi_modal_projector"] if config.train_projector else None)
    return get_peft_model(model, lora)


def load_adapter(model, adapter):
    """`model` (a loaded LLaVA) with the trained adapter `adapter` (a folder saved by train_llava, or a hub id of a
    peft adapter), for answering: a peft PeftModel, which ChatSession, ask and caption_folder take as they are.
    Safetensors only: peft's own from_pretrained falls back to a pickled adapter_model.bin, which this project never
    loads, so the folder is checked and its file loaded here (what from_pretrained does for a safetensors file)."""
    import safetensors.torch
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict

    runtime.ignore_old_torchao()

    folder = Path(str(adapter)).expanduser()
    if not folder.exists():   # a hub id: its config and safetensors file only
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(adapter), allow_patterns=["adapter_config.json",
                                                                      "adapter_model.safetensors"]))
    weights = folder / "adapter_model.safetensors"
    if not (folder / "adapter_config.json").is_file() or not weights.is_file():
        raise ValueError(f"{str(adapter)!r} holds no adapter_config.json and adapter_model.safetensors: pass the "
                         f"adapter folder a run saved (runs/<RUN_NAME>/{ADAPTER_DIR}), or a peft adapter in "
                         "safetensors.")
    config = PeftConfig.from_pretrained(str(folder))
    config.inference_mode = True   # the adapter frozen, as from_pretrained(is_trainable=False) makes it
    tuned = PeftModel(model, config)
    result = set_peft_model_state_dict(tuned, safetensors.torch.load_file(str(weights), device=str(model.device)))
    if result.unexpected_keys:
        raise ValueError(f"The adapter {str(adapter)!r} does not fit this model (unexpected "
                         f"{result.unexpected_keys[:3]}): load the base model it was trained on (its README.md "
                         "names it).")
    return tuned.eval()


def _quantization(config: LlavaTrainConfig, profile) -> str:
    if config.quantization != "auto":
        if config.quantization != "none" and profile.device != "cuda":
            raise ValueError(f"quantization={config.quantization!r} trains only on a CUDA GPU; on {profile.device} "
                             "use 'none' (or 'auto').")
        return config.quantization
    return "4bit" if profile.device == "cuda" else "none"


def _optimizer(config: LlavaTrainConfig, params, profile):
    import torch

    if config.optimizer == "paged_adamw8bit" or (config.optimizer == "auto" and profile.device == "cuda"):
        if profile.device != "cuda":
            raise ValueError("optimizer='paged_adamw8bit' needs a CUDA GPU (bitsandbytes); use 'adamw' or 'auto'.")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=config.learning_rate)
    return torch.optim.AdamW(params, lr=config.learning_rate)


def _to_device(example: dict, model) -> dict:
    out = {k: v.to(model.device) for k, v in example.items()}
    out["pixel_values"] = out["pixel_values"].to(model.dtype)
    return out


def evaluate_loss(model, processor, records, folder, max_side: int, accelerator=None) -> float | None:
    """The mean loss of the model over `records` (dropout off, no gradients); None where there are none."""
    import torch

    if not records:
        return None
    was_training = model.training
    model.eval()
    total = 0.0
    autocast = accelerator.autocast() if accelerator else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), autocast:
        for record in records:
            total += float(model(**_to_device(record_example(processor, record, folder, max_side), model)).loss)
    model.train(was_training)
    return total / len(records)


# ---------------------------------------------------------------------------------------------------- training

@dataclass
class LlavaTrainResult:
    run_dir: Path
    steps: int
    losses: list
    adapter_dir: Path | None          # the peft adapter (None until the last step is done)
    eval_before: float | None
    eval_after: float | None
    resumed_from: int | None
    train_records: int = 0
    eval_records: int = 0
    left_out: dict = dataclasses.field(default_factory=dict)   # record id -> why (too long)


def _lengths(processor, records, folder, max_side) -> list[int]:
    return [int(record_example(processor, r, folder, max_side)["input_ids"].shape[1]) for r in records]


def train_llava(config: LlavaTrainConfig, stop_after: int | None = None, progress: bool = True) -> LlavaTrainResult:
    """Train (or resume) a LoRA on LLaVA 1.6 from `config.data`. `stop_after`: stop once that many steps are done
    (as a disconnect would); the next call resumes. One training at a time per run folder. One process (no DDP)."""
    from .loop import run_lock

    with run_lock(Path(config.run_dir)):
        return _train_llava(config, stop_after, progress)


def _train_llava(config: LlavaTrainConfig, stop_after: int | None, progress: bool) -> LlavaTrainResult:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from .. import loading, registry
    from .loop import _mixed_precision, _set_base_learning_rates

    run_dir = Path(config.run_dir)
    max_steps = smoke.cap("train_steps", config.max_train_steps)
    profile = runtime.detect_profile()
    quantization = _quantization(config, profile)
    shaping = {**{name: getattr(config, name) for name in SHAPING_FIELDS}, "quantization": quantization}
    if checkpoints(run_dir):   # before the model is loaded
        done, latest = checkpoints(run_dir)[-1]
        check_resumable(latest, shaping)
        if done > max_steps:
            raise ValueError(f"`max_train_steps` is {max_steps}, but the run in {str(run_dir)!r} has already trained "
                             f"{done} steps ({latest.name}): ask for more to go on, or use a new run folder.")
    records = load_records(config)
    train, held = split_records(records, config.eval_fraction, config.seed)
    if not train:
        raise ValueError(f"{config.data!r} has records of {len({r['image'] for r in records})} image(s) only, all "
                         "held out: make records for more images, or set eval_fraction=0.")
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                              mixed_precision=_mixed_precision(config.mixed_precision, profile),
                              cpu=profile.device == "cpu")
    start_run(run_dir)
    settings = {**shaping, "run_id": run_id(run_dir)}
    set_seed(config.seed)

    if profile.device == "cuda":   # planned before GBs load: the largest sample an image at its full grid can make
        from .. import planner

        try:
            plan = planner.llava_training(config.base_model, profile, rank=config.rank,
                                          tokens=planner.LLAVA_IMAGE_TOKENS + PLANNED_TEXT_TOKENS)
        except planner.PlanUnavailable as e:
            print(f"{e} Training without a memory plan.")
        else:
            if not plan["fits"]:
                raise ValueError(planner.describe_llava_training(plan, config.base_model).replace("\n", "; "))
    model, processor = loading.load_llava(config.base_model, quantization=quantization, profile=profile)
    folder, side = config.image_folder, config.image_max_side
    print(describe_budget(processor, side))
    limit = config.max_tokens or model.config.text_config.max_position_embeddings
    left_out = {}
    for subset in (train, held):
        for record, length in zip(list(subset), _lengths(processor, subset, folder, side)):
            if length > limit:
                left_out[record["id"]] = f"{length} tokens, above {limit}"
                subset.remove(record)
    if left_out:
        print(f"{len(left_out)} sample(s) are longer than {limit} tokens and left out (never cut): lower "
              f"image_max_side or raise max_tokens. {', '.join(list(left_out)[:3])}")
    if not train:
        raise ValueError(f"Every training sample is longer than {limit} tokens: lower image_max_side.")
    if config.gradient_checkpointing:
        # transformers 5.23 renamed it (the old name warns); Colab's 5.15 may have only the old one
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = add_lora(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:   # trained weights in fp32 (the fp16 GradScaler needs them so); the frozen base stays as loaded
        p.data = p.data.float()
    optimizer = _optimizer(config, params, profile)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                              num_training_steps=max_steps)
    save_trained_only(accelerator)
    size = storage.size_text(checkpoint_bytes(params, type(optimizer).__name__.lower()))   # PagedAdamW8bit: 8bit
    print(f"{len(train)} training and {len(held)} held-out record(s); {sum(p.numel() for p in params):,} trained "
          f"weights; each checkpoint about {size}.")
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()

    step, resumed_from = 0, None
    eval_path = run_dir / EVAL_NAME
    if checkpoints(run_dir):
        resumed_from, latest = checkpoints(run_dir)[-1]
        accelerator.load_state(str(latest))
        step = resumed_from
        print(f"Resuming from {latest} (step {step} of {max_steps}).")
        changed = _set_base_learning_rates(scheduler, [config.learning_rate])
        if changed:
            print(f"The learning rate changed since the checkpoint ({changed}): the run goes on with the new one.")
    kept = saved_losses(latest) if resumed_from else None
    if kept is not None:
        write_losses(run_dir, kept)
    losses = kept if kept is not None else read_losses(run_dir, step)
    scores = json.loads(eval_path.read_text()) if eval_path.is_file() and resumed_from else {}
    if "before" not in scores:
        with torch.random.fork_rng(devices=[]):   # the training's random draws stay those of a run without eval
            scores = {"before": evaluate_loss(model, processor, held, folder, side, accelerator)}
        storage.atomic_write(eval_path, json.dumps(scores))
    if scores["before"] is not None:
        print(f"held-out loss before training: {scores['before']:.4f}")

    accumulation = config.gradient_accumulation_steps
    bar = tqdm(total=max_steps, initial=step, desc="training LLaVA", unit="step", disable=not progress)
    micro, step_losses = step * accumulation, []
    order, order_epoch = None, None
    while step < max_steps and (stop_after is None or step < stop_after):
        epoch, position = divmod(micro, len(train))
        if epoch != order_epoch:   # the data order of an epoch: fixed by the seed, so a resume sees the same
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
            order_epoch = epoch
        example = _to_device(record_example(processor, train[order[position]], folder, side), model)
        with accelerator.accumulate(model):
            loss = model(**example).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"The loss became {float(loss)} at step {step + 1}: lower learning_rate "
                                         "(e.g. by 10x) and run again; it resumes from the last checkpoint.")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        micro += 1
        step_losses.append(float(loss.detach()))
        if not accelerator.sync_gradients:
            continue
        step += 1
        losses.append(sum(step_losses) / len(step_losses))
        step_losses = []
        append_loss(run_dir, step, losses[-1])
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % config.checkpoint_every == 0 or step == max_steps:
            save_checkpoint(accelerator, run_dir, step, config.keep_checkpoints, settings, losses)
    bar.close()

    result = LlavaTrainResult(run_dir=run_dir, steps=step, losses=losses, adapter_dir=None,
                              eval_before=scores["before"], eval_after=None, resumed_from=resumed_from,
                              train_records=len(train), eval_records=len(held), left_out=left_out)
    if step >= max_steps:
        result.eval_after = evaluate_loss(model, processor, held, folder, side, accelerator)
        scores["after"] = result.eval_after
        storage.atomic_write(eval_path, json.dumps(scores))
        if result.eval_after is not None:
            print(f"held-out loss: {scores['before']:.4f} before, {result.eval_after:.4f} after")
        base = registry.resolve(config.base_model, task="vlm")
        result.adapter_dir = save_adapter(accelerator.unwrap_model(model), run_dir / ADAPTER_DIR,
                                          model_card(config, base.source, result, records, quantization))
        plot_losses(run_dir, losses)
    accelerator.free_memory()
    return result


def save_adapter(model, target: Path, card: str) -> Path:
    """The peft adapter (adapter_model.safetensors + adapter_config.json) and its README.md model card, written into
    a staging folder that replaces `target` once complete."""
    def write(staging: Path) -> None:
        model.save_pretrained(str(staging), safe_serialization=True)
        (staging / "README.md").write_text(card, encoding="utf-8")

    return storage.write_folder(target, write, "the adapter")


def model_card(config: LlavaTrainConfig, base_source: str, result: LlavaTrainResult, records,
               quantization: str = "none") -> str:
    """A short README.md for the adapter: base model, data, steps, settings, held-out loss before/after."""
    kinds = {}
    for r in records:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1

    def loss(value):
        return f"{value:.4f}" if value is not None else "n/a (no held-out images)"

    return "\n".join([
        "---", f"base_model: {base_source}", "library_name: peft", "tags: [llava-next, lora, qlora]", "---", "",
        f"# LoRA adapter for {config.base_model}: {Path(config.run_dir).name}", "",
        f"- Base model: `{config.base_model}` (`{base_source}`), "
        f"{ {'4bit': '4-bit nf4 (QLoRA)', '8bit': '8-bit'}.get(quantization, 'not quantized')} while training",
        f"- Data: {len(records)} records of {len({r['image'] for r in records})} images ("
        + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f"); {result.train_records} trained on, "
        f"{result.eval_records} held out, {len(result.left_out)} left out as too long",
        f"- Steps: {result.steps} x {config.gradient_accumulation_steps} samples; learning rate "
        f"{config.learning_rate:g} ({config.lr_scheduler}); LoRA rank {config.rank}, alpha {config.alpha:g}, "
        f"dropout {config.lora_dropout:g}; projector {'trained' if config.train_projector else 'frozen'}; "
        f"image_max_side {config.image_max_side or 'none'}",
        f"- Held-out loss: {loss(result.eval_before)} before, {loss(result.eval_after)} after", "",
        "Load it: `model, processor = h.load_llava(BASE, adapter=PATH)`, or "
        "`helpers.training.llava.load_adapter(model, PATH)` (peft's `PeftModel.from_pretrained`).", "",
        "Made with llava-sd-notebooks (notebook 09).", ""])


def train_llava_main(argv=None) -> int:
    """`python -m helpers train-llava RUN/config.json [--set KEY=VALUE ...]`: train, or resume, the run."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m helpers train-llava", description=(
        "Fine-tune LLaVA 1.6 with QLoRA on instruction records; run again to resume."))
    parser.add_argument("config", help="the run's config.json (notebook 09 writes it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change one setting")
    args = parser.parse_args(argv)
    overrides = {}
    for pair in args.set:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, e.g. --set max_train_steps=300, not {pair!r}.")
        try:
            overrides[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key.strip()] = text
    result = train_llava(read_llava_config(args.config, overrides))
    print(f"{result.steps} steps; adapter: {result.adapter_dir}")
    return 0
