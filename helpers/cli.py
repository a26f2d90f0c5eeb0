"""`python -m helpers ...`: the same functions as the notebooks, from a shell.

    python -m helpers doctor                     what this machine has, what is wrong, and how to fix it
    python -m helpers demo                       the main job: SD 1.5 paints an image, LLaVA 1.6 describes it
    python -m helpers chat IMAGE "QUESTION"      LLaVA answers a question about an image (streamed)
    python -m helpers caption FOLDER [--style detailed] [--trigger WORD] [--overwrite]
                                                 a kohya-style .txt caption beside every image (resumable)
    python -m helpers generate "PROMPT" [--negative ...] [--sampler NAME] [--steps N] [--seed S] [--out DIR]
    python -m helpers inpaint IMAGE MASK "PROMPT" [--strength 0.75] [--only-masked] [--out DIR]
    python -m helpers train-lora CONFIG.json [--set KEY=VALUE ...] [--steps N]
                                                 train (or resume) a LoRA from the config a notebook wrote
    python -m helpers dreambooth CONFIG.json [--set KEY=VALUE ...] [--steps N]
                                                 the same for a LoRA-DreamBooth run (needs instance_prompt)
"""
import argparse
import importlib.metadata
import importlib.util
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from . import runtime, smoke, storage

DIST = "llava-sd-notebooks"
DEMO_SD, DEMO_LLAVA = "sd15", "llava-1.6-mistral-7b"
CAPTION_STYLES = ("short", "detailed", "tags")  # helpers.captions.STYLES, named here to keep the CLI start light


# --- doctor ----------------------------------------------------------------------------------------------------------

def version_findings() -> list[str]:
    """Installed versions of our dependencies that fall outside the ranges in pyproject.toml."""
    from packaging.requirements import Requirement

    try:
        requires = importlib.metadata.requires(DIST) or []
    except importlib.metadata.PackageNotFoundError:
        return [f"the {DIST} package is not installed: run `bash colab_setup.sh` in the project folder"]
    findings = []
    for line in requires:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            findings.append(f"{req.name} is missing (tested: {req.specifier}): run `bash colab_setup.sh`")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            findings.append(f"{req.name} {have} is outside the tested range {req.specifier}: "
                            f"pip install '{req.name}{req.specifier}'")
    return findings


def runtime_findings(profile: runtime.Profile) -> list[str]:
    """Known problems of this runtime, each with its fix."""
    findings = []
    if profile.device == "cpu":
        findings.append("no GPU: the real models need one. On Colab: Runtime > Change runtime type > T4 GPU. "
                        "Here, HELPERS_TINY=1 runs everything on tiny offline models")
    if profile.device == "cuda":
        import torch

        if torch.cuda.is_bf16_supported() and not profile.native_bf16:
            findings.append(f"torch says bf16 is supported on this {profile.gpu_name} (cc "
                            f"{'.'.join(map(str, profile.compute_capability))}), but it is emulated and slow: the "
                            "helpers use fp16 here; do not pass dtype=torch.bfloat16")
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:
            findings.append(f"bitsandbytes does not load ({type(e).__name__}: {e}): 4-bit LLaVA needs it: "
                            "pip install 'bitsandbytes==0.50.2'")
    if importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision  # noqa: F401
        except Exception as e:
            findings.append(f"torchvision is installed but broken ({type(e).__name__}: {str(e)[:80]}), which breaks "
                            "transformers' image processors: pip uninstall -y torchvision, or install the "
                            "torchvision built for your torch")
    if profile.ram_gb and profile.ram_gb < 16:
        findings.append(f"RAM {profile.ram_gb:.1f} GB: load models straight to the GPU (the helpers do) and one "
                        "large model at a time; free each before loading the next")
    if profile.platform == "colab" and not Path("/content/drive/MyDrive").is_dir():
        findings.append("Google Drive is not mounted: outputs are lost at disconnect. Run helpers.setup() (it "
                        "mounts Drive) or helpers.mount_drive()")
    return findings


def hub_line() -> str:
    from huggingface_hub import get_token

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    token = "a token is set" if get_token() else ("no token (gated models such as sd3-medium and flux-dev need one: "
                                                  "the Colab secret HF_TOKEN or the HF_TOKEN variable)")
    return f"hub: {'offline (HF_HUB_OFFLINE=1)' if offline else 'online'}; {token}"


def doctor(args) -> int:
    profile = runtime.detect_profile()
    print(runtime.describe(profile, f"files {storage.project_root()}"))
    versions = []
    for dist in ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "huggingface_hub",
                 "safetensors", "ipywidgets"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} (missing)")
    print("versions: " + ", ".join(versions))
    print(hub_line())
    findings = version_findings() + runtime_findings(profile)
    for finding in findings:
        print(f"  [!] {finding}")
    print(f"{len(findings)} finding(s)." if findings else "No known problems found.")
    return 0


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

    from . import images, loading, registry, vlm

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
    parameters = images.parameters_text(args.prompt, args.negative, Steps=steps,
                                        Sampler=type(pipe.scheduler).__name__, CFG_scale=7.0, Seed=args.seed,
                                        Size=f"{width}x{height}", Model=DEMO_SD + (" (tiny)" if smoke.is_tiny() else ""))
    image_path = images.save_image(image, out, parameters, label=str(args.seed))
    print(f"image:   {image_path}  ({time.perf_counter() - t0:.1f} s)")
    del pipe
    clear_device_cache(garbage_collection=True)  # SD leaves the GPU before LLaVA arrives

    t0 = time.perf_counter()
    model, processor = loading.load_llava(DEMO_LLAVA, profile=profile)
    caption = vlm.ask(model, processor, image, "Describe this image in one sentence.", max_new_tokens=60)
    caption_path = storage.atomic_write(image_path.with_suffix(".txt"), caption + "\n")
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

    if not args.question.strip():  # bad input is refused before a model of several GB is loaded
        raise ValueError(f"The question must be a non-empty string, not {args.question!r}.")
    image = images.open_image(args.image)
    settings = vlm.GenerationSettings(max_new_tokens=args.max_new_tokens)
    _smoke_notice()
    model, processor = loading.load_llava(args.model, quantization=args.quantization)
    for piece in vlm.ChatSession(model, processor, settings=settings).stream(args.question, images=[image]):
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
                                     max_chars=args.max_chars, batch_size=args.batch_size, overwrite=args.overwrite)
    print(report)
    return 1 if report.failed else 0


# --- Stable Diffusion from the shell -------------------------------------------------------------------------------

def _lora_arg(text: str) -> tuple[str, float]:
    """PATH_OR_ID[:SCALE] -> (source, scale); a Windows drive letter or URL colon is not a scale."""
    source, _, scale = text.rpartition(":")
    try:
        return (source, float(scale)) if source else (text, 1.0)
    except ValueError:
        return text, 1.0


def _generate(args, **task) -> int:
    from . import diffusion, images, loading, lora, samplers

    settings = dict(negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=args.cfg,
                    width=args.width, height=args.height, num_images_per_prompt=args.batch_size,
                    batch_count=args.batch_count, seed=args.seed, sampler=args.sampler, clip_skip=args.clip_skip)
    # bad input is refused before a model of several GB is loaded
    diffusion.check_arguments(args.prompt, args.steps, args.cfg, args.width, args.height, args.batch_size,
                              args.batch_count, args.seed, task.get("strength", 0.75), task.get("image"),
                              task.get("mask_image"))
    if args.sampler:
        samplers.canonical(args.sampler)
    if "image" in task:
        task["image"] = images.open_image(task["image"])
    _smoke_notice()
    pipe = loading.load_sd(args.model, task="inpaint" if "mask_image" in task else "txt2img")
    for source, scale in map(_lora_arg, args.lora):
        lora.load_lora(pipe, source, scale=scale)
    result = diffusion.generate(pipe, args.prompt, **settings, **task)
    for path in result.save(args.out):
        print(path)
    return 0


def generate(args) -> int:
    return _generate(args, hires_scale=args.hires_scale)


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

    _smoke_notice()
    print(f"run folder: {config.run_dir}")
    done = loop.checkpoints(config.run_dir)
    if done:
        step, folder = done[-1]
        print(f"resume point: {folder.name} (step {step} of {config.max_train_steps})")
    else:
        print("resume point: none, a new run")
    result = loop.train_lora(config, progress=progress)
    print(f"steps done: {result.steps}")
    if not result.lora_path.is_file():
        print(f"error: the run stopped at step {result.steps} without writing its LoRA; run the same command again "
              "to resume.", file=sys.stderr)
        return 1
    print(f"lora: {result.lora_path}")
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
    p.add_argument("--sampler", default=None, help="A1111 name, e.g. 'DPM++ 2M Karras' (default: the model's own)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.0, help="CFG scale")
    p.add_argument("--seed", type=int, default=-1, help="-1: random (the seed used is saved in the PNG)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--batch-count", type=int, default=1)
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA (file, hub id or Google Drive link) and its scale; repeat for several")
    p.add_argument("--model", default=model, help="a catalogue name, hub id or local folder")
    p.add_argument("--out", help="output folder (default: the project's outputs/<task>)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check the runtime, versions, GPU, Drive; known problems with their fixes")
    p = sub.add_parser("demo", help="generate an image with SD 1.5 and describe it with LLaVA 1.6 "
                                    "(tiny offline models where there is no GPU or hub)")
    p.add_argument("--prompt", default="a watercolor painting of a lighthouse at sunset, soft light")
    p.add_argument("--negative", default="blurry, low quality")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", help="output folder (default: the project's outputs/demo)")
    p.add_argument("--progress", action="store_true", help="show the denoising progress bar")
    for name, text in (("chat", "answer a question about an image with LLaVA 1.6"),
                       ("caption", "caption every image in a folder into .txt files beside them")):
        p = sub.add_parser(name, help=text)
        if name == "chat":
            p.add_argument("image", help="an image file or URL")
            p.add_argument("question")
            p.add_argument("--max-new-tokens", type=int, default=256)
        else:
            p.add_argument("folder")
            p.add_argument("--style", choices=list(CAPTION_STYLES), default="detailed")
            p.add_argument("--trigger", help="a trigger word (or prefix) put first in every caption")
            p.add_argument("--overwrite", action="store_true", help="replace existing captions (default: skip)")
            p.add_argument("--batch-size", type=int, default=4)
            p.add_argument("--max-chars", type=int, help="cut captions at the last whole sentence that fits")
        p.add_argument("--model", default=DEMO_LLAVA, help="a catalogue name, hub id or local folder")
        p.add_argument("--quantization", choices=["auto", "4bit", "8bit", "none"], default="auto")
    p = sub.add_parser("generate", help="txt2img with A1111 controls; PNGs carry their parameters")
    p.add_argument("prompt")
    p.add_argument("--hires-scale", type=float, default=1.0, help="hires fix: upscale by this, then img2img")
    _sd_arguments(p, "sd15")
    p = sub.add_parser("inpaint", help="repaint the white area of MASK in IMAGE")
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
                       ("dreambooth", ("train (or resume) a LoRA-DreamBooth run from a config.json with "
                                       "instance_prompt (and class_prompt for prior preservation)"))):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="the config.json (the notebook writes one into the run folder), or that folder")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field (the value is read as JSON where it parses, else as text); repeat for "
                            "several, e.g. --set max_train_steps=500 --set trigger=sks")
        p.add_argument("--steps", type=int, help="the total number of training steps (same as --set "
                                                 "max_train_steps=N)")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    runtime.quiet_logging()
    try:
        commands = {"doctor": doctor, "demo": demo, "chat": chat, "caption": caption, "generate": generate,
                    "inpaint": inpaint, "train-lora": train_lora, "dreambooth": dreambooth}
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # bad input: the message says what to do, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
