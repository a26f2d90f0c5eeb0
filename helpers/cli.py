"""`python -m helpers ...`: the same functions as the notebooks, from a shell.

    python -m helpers doctor                     what this machine has, what is wrong, and how to fix it
    python -m helpers demo                       the main job: SD 1.5 paints an image, LLaVA 1.6 describes it
    python -m helpers chat IMAGE "QUESTION"      LLaVA answers a question about an image (streamed)
    python -m helpers caption FOLDER [--style detailed] [--trigger WORD] [--overwrite]
                                                 a kohya-style .txt caption beside every image (resumable)
    python -m helpers generate "PROMPT" [--negative ...] [--sampler NAME] [--steps N] [--seed S] [--out DIR]
                                                 [--lora FILE[:SCALE[:NAME]] ...]
    python -m helpers inpaint IMAGE MASK "PROMPT" [--strength 0.75] [--only-masked] [--out DIR]
    python -m helpers train-lora CONFIG.json [--set KEY=VALUE ...] [--steps N]
                                                 train (or resume) a LoRA (SD 1.5 or SDXL; use_dora) from the config
                                                 a notebook wrote; several GPUs: accelerate launch --multi_gpu
                                                 --num_processes 2 -m helpers train-lora CONFIG.json
    python -m helpers dreambooth CONFIG.json [--set KEY=VALUE ...] [--steps N]
                                                 the same for a DreamBooth run (needs instance_prompt; LoRA, or
                                                 --set method=full for the whole UNet)
    python -m helpers plan MODEL [--gpu t4|l4|a100-40|a100-80|cpu] [--resolution 1024] [--batch 1]
                                                 what MODEL needs and whether (and how) it fits that GPU
    python -m helpers bench [--models sd15 sdxl ...] [--shape-true] [--steps N] [--size PX] [--out DIR]
                                                 the same prompts and seeds through each model: speed, memory, quality
    python -m helpers check-dataset FOLDER [--resolution 512]
                                                 every image of a training folder opened: what would spoil a run

Every known error is one `error: ...` line (exit code 2); --debug (or HELPERS_DEBUG=1) shows its traceback. Ctrl-C
stops with exit code 130; a training run or captioning resumes where it stopped when run again.
"""
import argparse
import functools
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from . import oom, prompts, runtime, smoke, storage

DEMO_SD, DEMO_LLAVA = "sd15", "llava-1.6-mistral-7b"
CAPTION_STYLES = ("short", "detailed", "tags")  # helpers.captions.STYLES, named here to keep the CLI start light
# what the CLI prints as one `error:` line: bad input (ValueError, and its kinds one_file.CheckpointFileError and
# planner.PlanUnavailable), missing files and failed loads (OSError: loading's "Could not load ..."), NaN images, out
# of memory. Anything else is a bug, and keeps its traceback.
KNOWN_ERRORS = (ValueError, OSError, FloatingPointError, oom.OutOfMemoryStop)
RESUMABLE = ("train-lora", "dreambooth", "caption")   # Ctrl-C: run the same command again to resume


# --- argument types: a bad number is refused by the parser, before anything is imported or loaded ------------------

def _number(kind, low, high=None, what=None):
    """An argparse `type` that reads a `kind` (int or float) from `low` to `high` (None: no top)."""
    what = what or (f"a whole number from {low}" if kind is int else f"a number from {low}") + \
        (f" to {high}" if high is not None else " up")

    def read(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= (high if high is not None else value):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
        return value

    return read


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
steps_int = _number(int, 1, 500, "a whole number of steps from 1 to 500 (20-30 is usual)")


def _folder_check(args) -> None:
    """Refuse, in one line, a HELPERS_HOME this command would write into or a HELPERS_CACHE it would read its tiny
    models from that is a file or read-only (`python -m helpers doctor` reports the same)."""
    from .doctor import folder_problems

    writes_home = args.command in ("demo", "generate", "inpaint", "bench", "download") and not getattr(args, "out",
                                                                                                       None)
    loads_models = args.command not in ("doctor", "plan", "check-dataset", "download")
    for variable, problem in folder_problems().items():
        if (variable == storage.ENV_HOME and writes_home) or (variable == storage.ENV_CACHE and loads_models):
            raise ValueError(f"{problem}: point {variable} at a folder you can write to, or unset it"
                             + (" (or pass --out)" if variable == storage.ENV_HOME else "")
                             + ". See TROUBLESHOOTING.md#unusable-folder")


# --- doctor ----------------------------------------------------------------------------------------------------------

def doctor(args) -> int:
    from . import doctor as checks  # each check, with its fix and TROUBLESHOOTING.md anchor, is in helpers/doctor.py

    return checks.report(getattr(args, "model", None))


# --- demo ----------------------------------------------------------------------------------------------------------

def hub_reachable(repo_ids, timeout: float = 3.0) -> bool:
    """Whether the weights can be had: in the local cache, or the hub answers within `timeout` seconds."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = all(isinstance(try_to_load_from_cache(r, f), str)
                 for r, f in zip(repo_ids, ("model_index.json", "config.json")))
    if cached or constants.HF_HUB_OFFLINE:
        return cached
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def demo(args) -> int:
    import torch
    from accelerate.utils.memory import clear_device_cache

    from . import captions, images, loading, registry, vlm

    profile = runtime.detect_profile()
    if not smoke.is_tiny():
        repo_ids = [registry.MODELS[DEMO_SD].repo_id, registry.MODELS[DEMO_LLAVA].repo_id]
        reason = ("no CUDA GPU here" if profile.device != "cuda"
                  else None if hub_reachable(repo_ids) else "the model hub cannot be reached and the weights are "
                                                            "not in the local cache")
        if reason:
            print(f"SMOKE MODE: {reason}, so the demo runs on tiny random-weight models instead of SD 1.5 and "
                  "LLaVA 1.6. It proves the whole path runs; the image and the caption are noise.")
            smoke.use_tiny()
    out = Path(args.out) if args.out else storage.project_paths().outputs / "demo"
    print(runtime.describe(profile, f"files {out}"))

    t0 = time.perf_counter()
    pipe = loading.load_sd(DEMO_SD, "txt2img", profile=profile)
    pipe.set_progress_bar_config(disable=not args.progress)
    steps = smoke.cap("steps", args.steps)
    width, height = smoke.cap_size(512, 512)
    image = pipe(prompt=args.prompt, negative_prompt=args.negative, num_inference_steps=steps, guidance_scale=7.0,
                 width=width, height=height, generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
    from . import samplers

    parameters = images.parameters_text(args.prompt, args.negative, Steps=steps, Sampler=samplers.sampler_name(pipe),
                                        Schedule_type=samplers.schedule_type(pipe), CFG_scale=7.0, Seed=args.seed,
                                        Size=f"{width}x{height}", Model=DEMO_SD + (" (tiny)" if smoke.is_tiny() else ""))
    image_path = images.save_image(image, out, parameters, label=str(args.seed))
    print(f"image:   {image_path}  ({time.perf_counter() - t0:.1f} s)")
    del pipe
    clear_device_cache(garbage_collection=True)  # SD leaves the GPU before LLaVA arrives

    t0 = time.perf_counter()
    model, processor = loading.load_llava(DEMO_LLAVA, profile=profile)
    caption = vlm.ask(model, processor, image, "Describe this image in one sentence.", max_new_tokens=60)
    caption_path = captions.write_caption(image_path, caption)   # one line, beside the image
    print(f"caption: {caption_path}  ({time.perf_counter() - t0:.1f} s)")
    print(f"         {caption!r}")
    if smoke.is_tiny():
        print(f"SMOKE MODE: {smoke.NOISE_NOTICE}.")
    return 0


# --- LLaVA from the shell --------------------------------------------------------------------------------------------

def _smoke_notice() -> None:
    if smoke.is_tiny():
        print(f"SMOKE MODE: {smoke.NOISE_NOTICE}.", file=sys.stderr)


def chat(args) -> int:
    from . import images, loading, vlm

    if prompts.is_blank(args.question):  # bad input is refused before a model of several GB is loaded
        raise ValueError(f"The question must be a non-empty string, not {args.question!r}.")
    image = images.open_image(args.image)
    settings = vlm.GenerationSettings(max_new_tokens=args.max_new_tokens)
    _smoke_notice()
    model, processor = loading.load_llava(args.model, quantization=args.quantization)
    session = vlm.ChatSession(model, processor, settings=settings, image_budget=args.image_budget)
    for piece in session.stream(args.question, images=[image]):
        print(piece, end="", flush=True)
    print()
    return 0


def caption(args) -> int:
    from . import captions, images, loading

    if not images.list_images(args.folder):
        raise ValueError(f"No images in {args.folder!r} (looked for .png, .jpg, .webp, ... in it and its sub-folders).")
    _smoke_notice()
    model, processor = loading.load_llava(args.model, quantization=args.quantization)
    report = captions.caption_folder(args.folder, model, processor, style=args.style, trigger=args.trigger,
                                     image_budget=args.image_budget,
                                     max_chars=args.max_chars, batch_size=args.batch_size, overwrite=args.overwrite)
    print(report)
    return 1 if report.failed else 0


# --- Stable Diffusion from the shell -------------------------------------------------------------------------------

def _lora_arg(text: str) -> tuple[str, float, str | None]:
    """PATH_OR_ID[:SCALE[:NAME]] -> (source, scale, name), split from the right: a colon in the path (a URL's, say)
    stays in the path unless a number follows it."""
    def number(part):
        try:
            return float(part)
        except ValueError:
            return None

    parts = text.rsplit(":", 2)
    if len(parts) == 3 and parts[0] and number(parts[1]) is not None:
        return parts[0], number(parts[1]), parts[2].strip() or None
    parts = text.rsplit(":", 1)
    if len(parts) == 2 and parts[0] and number(parts[1]) is not None:
        return parts[0], number(parts[1]), None
    return text, 1.0, None


def _generate(args, **task) -> int:
    from . import diffusion, images, loading, lora, masks, samplers

    settings = dict(negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=args.cfg,
                    width=args.width, height=args.height, num_images_per_prompt=args.batch_size,
                    batch_count=args.batch_count, seed=args.seed, sampler=args.sampler,
                    schedule_type=args.schedule_type, clip_skip=args.clip_skip)
    # bad input is refused before a model of several GB is loaded
    prompts.check_prompt(args.prompt)
    diffusion.check_arguments(args.prompt, args.steps, args.cfg, args.width, args.height, args.batch_size,
                              args.batch_count, args.seed, task.get("strength", 0.75), task.get("image"),
                              task.get("mask_image"))
    if args.sampler or args.schedule_type:
        samplers.parse(args.sampler, args.schedule_type)
    if "image" in task:
        task["image"] = images.open_image(task["image"])
    if "mask_image" in task:  # read, and resized to the image (with a notice), before loading
        task["mask_image"] = masks.load_mask(task["mask_image"], size=task["image"].size)
    loras = [(lora.prepare(source, scale=scale), scale, name) for source, scale, name in map(_lora_arg, args.lora)]
    _smoke_notice()
    pipe = loading.load_sd(args.model, task="inpaint" if "mask_image" in task else "txt2img",
                           quantization=args.quantization)
    for path, scale, name in loras:
        lora.load_lora(pipe, str(path), scale=scale, name=name)
    result = diffusion.generate(pipe, args.prompt, **settings, **task)
    for path in result.save(args.out):
        print(path)
    return 0


def generate(args) -> int:
    return _generate(args, hires_scale=args.hires_scale, hires_upscaler=args.hires_upscaler)


def inpaint(args) -> int:
    return _generate(args, image=args.image, mask_image=args.mask, strength=args.strength, mask_blur=args.mask_blur,
                     inpaint_area="only_masked" if args.only_masked else "whole", padding=args.padding,
                     invert_mask=args.invert_mask)


# --- training from the shell ----------------------------------------------------------------------------------------

def _read_train_config(args):
    """The TrainConfig of `args.config` with the --set and --steps overrides: checked before any model is loaded."""
    from .training import config as training_config

    overrides = training_config.parse_overrides(args.set)
    if args.steps is not None:
        overrides["max_train_steps"] = args.steps
    return training_config.read_config(args.config, overrides)


def _train(config, progress: bool) -> int:
    """Train (or resume) the run of `config`, saying where it is, where it resumes and where its LoRA is."""
    from .training import loop

    # under `accelerate launch` every process runs this: the first one speaks for them all
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *args, **kwargs: None)
    if say is print:
        _smoke_notice()
    say(f"run folder: {config.run_dir}")
    done = loop.checkpoints(config.run_dir)
    if done:
        step, folder = done[-1]
        say(f"resume point: {folder.name} (step {step} of {config.max_train_steps})")
    else:
        say("resume point: none, a new run")
    result = loop.train_lora(config, progress=progress)
    say(f"steps done: {result.steps}")
    what = "model" if config.method == "full" else "lora"
    if not result.output.exists():
        say(f"error: the run stopped at step {result.steps} without writing its {what}; run the same command again "
            "to resume.", file=sys.stderr)
        return 1
    say(f"{what}: {result.output}")
    if result.single_file:
        say(f"A1111 checkpoint: {result.single_file}")
    return 0


def train_lora(args) -> int:
    return _train(_read_train_config(args), args.progress)


def dreambooth(args) -> int:
    config = _read_train_config(args)
    if not (config.instance_prompt or "").strip():  # refused before a model of several GB is loaded
        raise ValueError(f"dreambooth needs `instance_prompt` (the one prompt of every instance image, its rare token "
                         f"and class noun), which {args.config!r} lacks: add it to the file, or pass --set "
                         "\"instance_prompt=a photo of sks dog\" (for a LoRA on per-image captions, use train-lora).")
    print(f"instance prompt: {config.instance_prompt!r}")
    if config.class_prompt:
        print(f"class images: {Path(config.run_dir) / 'class_images'} ({config.num_class_images} of "
              f"{config.class_prompt!r}, painted by the base model before training and kept for the next run)")
    else:
        print("class images: none (prior preservation is off: set class_prompt, e.g. \"a photo of a dog\", to turn "
              "it on)")
    return _train(config, args.progress)


def _sd_arguments(p, model: str) -> None:
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--sampler", default=None, help="A1111 name, e.g. 'DPM++ 2M' (default: DPM++ 2M; SD3/FLUX: Euler)")
    p.add_argument("--schedule-type", default=None,
                   help="A1111 schedule type: Automatic (default), Karras, Exponential, Uniform, SGM Uniform, ...")
    p.add_argument("--steps", type=steps_int, default=25)
    p.add_argument("--cfg", type=float, default=7.0, help="CFG scale")
    p.add_argument("--seed", type=int, default=-1, help="-1: random (the seed used is saved in the PNG)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--batch-count", type=int, default=1)
    p.add_argument("--clip-skip", type=_number(int, 1, 12, "a whole number from 1 (no skip) to 12"), default=1)
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE[:NAME]]",
                   help="a LoRA (file, run folder, hub id or Google Drive link), its scale (default 1) and adapter "
                        "name (default: from the file, or its run's folder); repeat for several")
    p.add_argument("--model", default=model, help="a catalogue name or alias, hub id, local folder, one-file "
                                                  ".safetensors checkpoint, or a link to one (Civitai, Hugging Face)")
    p.add_argument("--quantization", choices=["auto", "4bit", "8bit", "none"], default="auto",
                   help="auto: the planner's choice on a GPU (4-bit nf4 for SD3 and FLUX on a T4), none on the CPU")
    p.add_argument("--out", help="output folder (default: the project's outputs/<task>)")


# --- plan ------------------------------------------------------------------------------------------------------------

def plan(args) -> int:
    from . import planner

    if args.train:   # a QLoRA fine-tune of LLaVA (helpers.training.llava)
        print(planner.describe_llava_training(planner.llava_training(args.model, args.gpu, tokens=args.tokens,
                                                                     rank=args.rank), args.model))
        return 0
    print(planner.describe(planner.plan(args.model, args.gpu, resolution=args.resolution, batch=args.batch,
                                        quantization=args.quantization)))
    return 0


# --- download --------------------------------------------------------------------------------------------------------

def download(args) -> int:
    from . import models

    print(models.download(args.url, kind=args.kind, progress=args.progress))
    return 0


# --- bench -----------------------------------------------------------------------------------------------------------

def _bench_argv(args) -> list[str]:
    """The bench options that were set, as a command line (for the report: how to repeat the run)."""
    argv = ["--models", *args.models] + ["--shape-true"] * args.shape_true + ["--no-quality"] * (not args.quality)
    for flag, value, default in (("--steps", args.steps, None), ("--size", args.size, None), ("--seed", args.seed, 0),
                                 ("--warmup", args.warmup, 1), ("--prompts", args.prompts, None),
                                 ("--reference", args.reference, None), ("--vram-cap", args.vram_cap, None),
                                 ("--out", args.out, None)):
        argv += [flag, str(value)] if value != default else []
    return argv


def bench(args) -> int:
    from . import bench as harness
    from .bench.harness import check_reference

    if args.quality and not args.shape_true:
        check_reference(args.reference, "--reference")  # before any model runs

    if not smoke.is_tiny() and not args.shape_true and runtime.detect_profile().device != "cuda":
        print("SMOKE MODE: no CUDA GPU here, so the benchmark runs on tiny random-weight models (its figures are the "
              "cost of the code path; --shape-true measures the real-size architectures with random weights).")
        smoke.use_tiny()
    elif smoke.is_tiny():
        print(f"SMOKE MODE: {smoke.NOISE_NOTICE}.")
    setting = {k: v for k, v in (("num_inference_steps", args.steps), ("size", args.size)) if v is not None}
    result = harness.run_benchmark(args.models, prompts=harness.load_prompts(args.prompts) if args.prompts else None,
                                   seed=args.seed, settings=[setting], warmup=args.warmup, shape_true=args.shape_true,
                                   quality=args.quality, reference=args.reference,
                                   command=harness.command_line("-m", ["helpers", "bench", *_bench_argv(args)]),
                                   vram_cap_gib=args.vram_cap)
    files = harness.write_results(result, args.out)
    print(harness.markdown_table(result.rows))
    for key in ("markdown", "csv", "json", "speed_plot", "quality_plot"):
        if key in files:
            print(f"{key}: {files[key]}")
    if files["grids"]:
        print(f"grids: {files['grids'][0].parent} ({len(files['grids'])} prompts)")
    failed = [r["model"] for r in result.rows if r["error"]]
    if failed:
        print(f"error: {', '.join(failed)} failed (the reason is in the results and above)", file=sys.stderr)
    return 1 if failed else 0


# --- check-dataset ---------------------------------------------------------------------------------------------------

def check_dataset(args) -> int:
    from .training import datasets

    report = datasets.check_dataset(args.folder, args.resolution, progress=False)
    print(report)
    return 0 if report.ok else 1


def instruct(args) -> int:
    from .instruct import instruct_main

    return instruct_main(args.rest)


def train_llava_command(args) -> int:
    from .training.llava import train_llava_main

    return train_llava_main(args.rest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of known errors too (as "
                                                             "HELPERS_DEBUG=1 does)")
    common = argparse.ArgumentParser(add_help=False)  # --debug after the command, too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    command = functools.partial(sub.add_parser, parents=[common])

    p = command("doctor", help="check the runtime, versions, GPU, Drive; known problems with their fixes")
    p.add_argument("--model", help="also check RAM and hub token for this catalogue model, e.g. sd3-medium")
    p = command("demo", help="generate an image with SD 1.5 and describe it with LLaVA 1.6 "
                             "(tiny offline models where there is no GPU or hub)")
    p.add_argument("--prompt", default="a watercolor painting of a lighthouse at sunset, soft light")
    p.add_argument("--negative", default="blurry, low quality")
    p.add_argument("--steps", type=steps_int, default=25)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", help="output folder (default: the project's outputs/demo)")
    p.add_argument("--progress", action="store_true", help="show the denoising progress bar")
    for name, text in (("chat", "answer a question about an image with LLaVA 1.6"),
                       ("caption", "caption every image in a folder into .txt files beside them")):
        p = command(name, help=text)
        if name == "chat":
            p.add_argument("image", help="an image file or URL")
            p.add_argument("question")
            p.add_argument("--max-new-tokens", type=positive_int, default=256)
        else:
            p.add_argument("folder")
            p.add_argument("--style", choices=list(CAPTION_STYLES), default="detailed")
            p.add_argument("--trigger", help="a trigger word (or prefix) put first in every caption")
            p.add_argument("--overwrite", action="store_true", help="replace existing captions (default: skip)")
            p.add_argument("--batch-size", type=positive_int, default=4)
            p.add_argument("--max-chars", type=int, help="cut captions at the last whole sentence that fits")
        p.add_argument("--model", default=DEMO_LLAVA, help="a catalogue name, hub id or local folder")
        p.add_argument("--quantization", choices=["auto", "4bit", "8bit", "none"], default="auto")
        p.add_argument("--image-budget", choices=["low", "medium", "high", "auto"],
                       default="auto" if name == "chat" else "high",
                       help="image tokens: low = the base view and one tile (fastest), high = the whole grid")
    p = command("generate", help="txt2img with A1111 controls; PNGs carry their parameters")
    p.add_argument("prompt")
    p.add_argument("--hires-scale", type=_number(float, 1, 4, "a number from 1 (off) to 4"), default=1.0,
                   help="hires fix: upscale by this, then img2img")
    p.add_argument("--hires-upscaler", default="Latent", help="hires fix upscaler: Latent (A1111's default) or Lanczos")
    _sd_arguments(p, "sd15")
    p = command("inpaint", help="repaint the white area of MASK in IMAGE")
    p.add_argument("image")
    p.add_argument("mask", help="white = repaint, black = keep")
    p.add_argument("prompt")
    p.add_argument("--strength", type=float, default=0.75)
    p.add_argument("--mask-blur", type=float, default=4)
    p.add_argument("--invert-mask", action="store_true")
    p.add_argument("--only-masked", action="store_true", help="paint the masked area (plus --padding) at full size")
    p.add_argument("--padding", type=int, default=32)
    _sd_arguments(p, "sd15-inpaint")
    for name, text in (("train-lora", "train (or resume) a LoRA from a config.json of TrainConfig fields"),
                       ("dreambooth", ("train (or resume) a DreamBooth run (LoRA, or method=full) from a "
                                       "config.json with instance_prompt (and class_prompt for prior preservation)"))):
        p = command(name, help=text)
        p.add_argument("config", help="the config.json (the notebook writes one into the run folder), or that folder")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field (the value is read as JSON where it parses, else as text); repeat for "
                            "several, e.g. --set max_train_steps=500 --set trigger=sks")
        p.add_argument("--steps", type=positive_int, help="the total number of training steps (same as --set "
                                                          "max_train_steps=N)")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p = command("plan", help="what a catalogue model needs (weights, activations, RAM) and how it fits a GPU")
    p.add_argument("model", help="a catalogue name or alias (sdxl, 'SD 1.5'), a hub id, a folder or a one-file "
                                 ".safetensors checkpoint")
    p.add_argument("--gpu", default="t4", choices=["t4", "l4", "a100-40", "a100-80", "cpu"])
    p.add_argument("--resolution", type=positive_int, help="image size in pixels (default: the model's native size)")
    p.add_argument("--batch", type=positive_int, default=1, help="images at once")
    p.add_argument("--quantization", choices=["auto", "4bit", "8bit", "none"], default="auto",
                   help="auto: the planner picks (4-bit where 16-bit does not fit); none: 16-bit routes only")
    p.add_argument("--train", choices=["qlora"], help="plan a QLoRA fine-tune of a LLaVA model instead (notebook 09)")
    p.add_argument("--tokens", type=positive_int, default=3184,
                   help="--train: tokens a sample, image tokens included (LLaVA 1.6 at its full grid: 2,928 for the "
                        "image; fewer with a lower image budget)")
    p.add_argument("--rank", type=positive_int, default=8, help="--train: the LoRA rank")
    p = command("bench", help="benchmark models on the same prompts and seeds: speed, VRAM, RAM, CLIP score")
    p.add_argument("--models", nargs="+", default=["sd15", "sdxl"], help="catalogue names, hub ids or folders")
    p.add_argument("--shape-true", action="store_true", help="real-size architectures with random weights: speed and "
                                                            "memory only, no download")
    p.add_argument("--steps", type=steps_int, help="denoising steps (default: each model's usual)")
    p.add_argument("--size", type=positive_int, help="square image side in pixels (default: each model's native "
                                                     "size)")
    p.add_argument("--prompts", help="a .tsv/.csv with a Prompt column or a .txt (default: assets/prompts)")
    p.add_argument("--seed", type=int, default=0, help="prompt i gets seed + i, for every model")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="warm-up runs after each load")
    p.add_argument("--no-quality", dest="quality", action="store_false", help="skip the CLIP score")
    p.add_argument("--reference", help="a folder of reference images: adds FID and KID against it")
    p.add_argument("--vram-cap", type=float, help="cap CUDA memory at this many GiB (15: a T4 on a larger GPU)")
    p.add_argument("--out", help="results folder (default: the project's outputs/bench/<date-time>)")
    p = command("download", help="fetch a model, LoRA or embedding from a link (Civitai page or download link, "
                                 "Hugging Face file URL, direct or Drive link) into the project's models/ folder; "
                                 "resumed if cut, reused if fetched before")
    p.add_argument("url")
    p.add_argument("--kind", choices=["checkpoint", "lora", "embedding"],
                   help="where it goes (default: Civitai's type, else checkpoint)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    for name, text in (("instruct", "write LLaVA-Instruct records (conversation, detail, reasoning) for every "
                                     "captioned image of a folder; run again to go on (see instruct -h)"),
                       ("train-llava", "fine-tune (or resume) LLaVA 1.6 with QLoRA on instruction records, from a "
                                       "run's config.json (see train-llava -h)")):
        p = command(name, help=text, add_help=False)   # its own parser (instruct_main, train_llava_main) reads on
        p.add_argument("rest", nargs=argparse.REMAINDER)
    p = command("check-dataset", help="open every image of a training folder and report what would spoil a run "
                                      "(unreadable, too small, uncaptioned); exit code 1 when not ready")
    p.add_argument("folder", help="the dataset folder (kohya layout: N_concept sub-folders, or images directly)")
    p.add_argument("--resolution", type=positive_int, default=512, help="the training resolution (images under half "
                                                                        "of it a side are too small)")
    args, unknown = parser.parse_known_args(argv)
    if args.command in ("instruct", "train-llava"):   # their own parsers read the rest, -h included
        args.rest = unknown + args.rest
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    debug = args.debug or os.environ.get("HELPERS_DEBUG", "") not in ("", "0")
    commands = {"doctor": doctor, "demo": demo, "chat": chat, "caption": caption, "generate": generate,
                "inpaint": inpaint, "train-lora": train_lora, "dreambooth": dreambooth, "plan": plan, "bench": bench,
                "check-dataset": check_dataset, "download": download, "instruct": instruct,
                "train-llava": train_llava_command}
    try:
        runtime.quiet_logging()
        _folder_check(args)
        return commands[args.command](args)
    # bad input, a failed load, NaN, out of memory: the message says what to do, no traceback
    except KNOWN_ERRORS as e:
        if debug:
            raise
        print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("stopped; run the same command again to resume" if args.command in RESUMABLE else "stopped",
              file=sys.stderr)
        return 130
