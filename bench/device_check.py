"""What only a GPU shows, in one run: real-size random-weight models under a T4-sized memory cap, one process a part.

    python bench/device_check.py [--dry-run] [--only sd15,sdxl,...] [--out bench/results/gpu_<card>.md]
                                 [--budget 470] [--limit PART=SECONDS ...] [--fail PART]

Parts (names for --only, which runs them in the order given), here in order of importance:
    sd15, sdxl                fp16 at 512 / 1024 px: it/s and s/image, plain (load_sd(fast=False)) against the fast
                              path (helpers.fast.speed_up) on the same pipeline, the arms interleaved, same seed
    train-sd15, train-sdxl    a LoRA run of helpers.training.loop.train_lora on a few drawn images: steps/s and peak
                              VRAM with fp16, 8-bit AdamW and gradient checkpointing
    flux-schnell, sd3-medium  4-bit nf4 (load_sd(folder, quantization="4bit"), the route the planner picks for a T4)
    llava                     LLaVA 1.6 mistral-7b in 4-bit: first-token latency and decode tok/s at each image budget

Each model is built here with random weights from its real architecture (assets/configs: helpers.planner.
build_shape_true; LLaVA from its config.json) on the GPU, saved to a temporary folder, and measured in a child process
that loads that folder the way a notebook does (load_sd / load_llava with a T4 profile, train_lora), under
torch.cuda.set_per_process_memory_fraction(15 GiB / the card's memory). A child that raises, runs out of memory,
crashes or passes its time limit (--limit) is a row saying so, and the run goes on; no part starts once --budget
seconds are spent (default 470: one 8-minute device call, less its start). Peak RAM is the child's own (ru_maxrss);
peak VRAM is torch's (allocated / reserved). The page, bench/results/gpu_<card>.md, puts the planner's T4 prediction
beside each measured peak. Random weights give true speed and memory, never quality (their images are noise).

--dry-run: the same parts, processes and page on the CPU, the models built from the tiny checkpoints' configs
(HELPERS_TINY=1) instead of the real ones; nothing else differs. No memory cap. Writes bench/results/gpu_dry-run.md.

On a device machine (no network; its image lacks diffusers and bitsandbytes and has an older transformers), carry the
wheels (about 61 MiB) made here with:
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .whl \\
        diffusers==0.42.1 bitsandbytes==0.50.2 transformers==5.23.0 peft==0.21.2
and run, carrying .whl:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 bench/device_check.py 2>&1 | tee $OUT/log; cp bench/results/gpu_*.md $OUT/
"""
import argparse
import gc
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the helpers package, when run as a script from anywhere

import helpers  # noqa: E402
from helpers import runtime, smoke  # noqa: E402
from helpers.bench import command_line, machine, peak_rss_mib, results_page, route_of, versions  # noqa: E402

GIB = 2**30
CAP_GIB = 15.0            # a T4's usable memory (FACTS.md: 15360 MiB)
BUDGET_S = 470            # one device call is at most 8 minutes
MIN_PART_S = 20           # no part starts with less of the budget left
PROMPT = "a photo of a cat sitting on a windowsill, soft morning light"
QUESTION = "Describe this picture in detail."
SEED = 0
REPEATS = 3               # timed images of each arm after its first
LLAVA_RUNS = 2            # timed answers at each image budget (after one warm-up answer)
BUDGETS = ("low", "medium", "high")
DRY_SENTENCE = ("dry run on the CPU with the tiny models (HELPERS_TINY=1): it checks this script end to end (build, "
                "child processes, this page); no figure here is a model's speed or memory, and no memory cap applies")
NOT_T4 = ("{card} is not a T4: the memory cap holds, the speed does not transfer: an H100/H200 is several times faster "
          "than a T4, so its it/s, s/image and tok/s are far above a T4's; its peaks are what a T4 must hold")
HEADER = ("| part | arm | setting | speed | s/image | first s | load s | peak VRAM GiB alloc/reserved | planner VRAM GiB "
          "| peak RAM in load GiB | planner RAM GiB | peak RAM GiB | part s | status |")


@dataclass(frozen=True)
class Part:
    name: str
    kind: str                 # "generate", "train" or "llava"
    model: str                # the catalogue name whose architecture is built
    size: int = 0             # image side in px
    steps: int = 0            # denoising steps; training steps; LLaVA: new tokens an answer
    quantization: str = "none"
    guidance: float = 7.0
    fast_arm: bool = False    # measure the fast path against the plain pipeline
    limit_s: int = 120        # the child is killed past this


PARTS = {p.name: p for p in (
    Part("sd15", "generate", "sd15", 512, 20, fast_arm=True, limit_s=90),
    Part("sdxl", "generate", "sdxl", 1024, 20, fast_arm=True, limit_s=120),
    Part("train-sd15", "train", "sd15", 512, 12, limit_s=90),
    Part("train-sdxl", "train", "sdxl", 1024, 10, limit_s=120),
    Part("flux-schnell", "generate", "flux-schnell", 1024, 4, "4bit", guidance=0.0, limit_s=200),
    Part("sd3-medium", "generate", "sd3-medium", 1024, 20, "4bit", limit_s=150),
    Part("llava", "llava", "llava-1.6-mistral-7b", steps=48, quantization="4bit", limit_s=150),
)}


def bench_module(name: str):
    """A script of bench/ as a module (they are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def card_slug(card: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "gpu"


def config_source(part: Part, dry: bool) -> str:
    """Where the architecture of `part`'s model comes from: the real configs (assets/configs) or, in a dry run, the
    tiny checkpoint of its family (the 64-wide one that bitsandbytes quantizes on a CPU, for 4-bit parts)."""
    from helpers import planner, registry

    if dry:
        task = "vlm" if part.kind == "llava" else "txt2img"
        return registry.resolve(part.model, task=task, quantized=part.quantization == "4bit").source
    return str(planner.config_dir(part.model))


# --- building the random-weight checkpoints (in the parent: its memory is not measured) -----------------------------

def build_llava(source: str, folder: Path, dtype, device: str) -> None:
    """A LLaVA-NeXT checkpoint of the architecture in `source`/config.json with random weights, and a processor that
    agrees with it (image size, patch, pinpoints); the tokenizer is helpers.tiny's stand-in, whose ids stay in range."""
    import torch
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    from helpers import tiny

    config = LlavaNextConfig.from_pretrained(source)
    tok = tiny._llava_tokenizer("mistral")
    config.image_token_index = tok.convert_tokens_to_ids("<image>")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config.text_config, key, getattr(tok, key))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.no_grad():
            model = LlavaNextForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = tok.pad_token_id
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                              image_grid_pinpoints=config.image_grid_pinpoints, do_pad=True)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                                   num_additional_image_tokens=1, chat_template=tiny.CHAT_TEMPLATES["mistral"])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def build(part: Part, source: str, folder: Path, dry: bool) -> None:
    """Save a random-weight checkpoint of `source`'s architecture into `folder` (fp16 on the GPU; fp32 in a dry run)."""
    import torch

    from helpers import planner

    dtype, device = (torch.float32, "cpu") if dry else (torch.float16, "cuda")
    if part.kind == "llava":
        build_llava(source, folder, dtype, device)
    else:
        planner.build_shape_true(source, dtype=dtype, device=device).save_pretrained(folder)
    gc.collect()
    if not dry:
        torch.cuda.empty_cache()


def disk_needed(source: str) -> float:
    """Bytes the checkpoint of `source` takes in fp16 (the planner's exact counts)."""
    from helpers import planner

    return sum(planner.weights(source, "float16").values())


def measured_size(part: Part) -> int:
    """The image side the part runs at: SMOKE MODE's cap in a dry run (smoke.cap, without its notice)."""
    return min(part.size, smoke.LIMITS["size"]) if smoke.is_tiny() else part.size


def predictions(part: Part, source: str) -> dict:
    """The planner's T4 figures for `part` (GiB): what the measured peaks are compared with."""
    from helpers import planner

    if part.kind == "train":  # the planner has no LoRA estimate: its full fine-tune one is the upper bound shown
        return {"planner_vram_gib": planner.training_bytes(source, "adamw8bit", measured_size(part)) / GIB,
                "planner_note": "planner: full fine-tune estimate (it has no LoRA one)"}
    p = planner.plan(source, "t4", resolution=measured_size(part) or None, quantization=part.quantization)
    return {"planner_vram_gib": p.vram_peak / GIB, "planner_ram_gib": p.ram_peak / GIB,
            "planner_route": p.route, "planner_verdict": p.verdict}


def llava_prediction(source: str, prompt_tokens: int, new_tokens: int) -> float:
    """The planner's VRAM (GiB) for a 4-bit LLaVA answer of exactly this many prompt and new tokens."""
    from helpers import planner

    weights = sum(planner.weights(source, "float16", "4bit").values())
    act = planner.llava_activations(source, "float16", image_tokens=prompt_tokens, text_tokens=0,
                                    new_tokens=new_tokens)
    return (weights + sum(act.values())) / GIB + planner.CUDA_OVERHEAD_GIB


# --- the child: one part, measured in a process of its own ---------------------------------------------------------

def _now(cuda: bool) -> float:
    if cuda:
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def _vram(cuda: bool) -> dict:
    if not cuda:
        return {"peak_vram_alloc_gib": None, "peak_vram_reserved_gib": None}
    import torch

    return {"peak_vram_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_vram_reserved_gib": torch.cuda.max_memory_reserved() / GIB}


def plain_again(pipe) -> None:
    """Undo helpers.fast.speed_up (without compile or step cache): the original attention processors and contiguous
    weights, the state load_sd(fast=False) gives. The fused weights stay allocated, unused."""
    import torch

    for name in ("unet", "transformer", "vae"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        if getattr(module, "original_attn_processors", None) is not None:
            module.unfuse_qkv_projections()
        if name in ("unet", "vae"):
            module.to(memory_format=torch.contiguous_format)


def measure_generate(part: Part, folder: str, profile, cuda: bool, records: list) -> None:
    import numpy as np
    import torch

    from helpers import diffusion
    from helpers.fast import speed_up

    # Workaround, for this script only: random weights in fp16 may overflow to NaN or black images, which generate
    # refuses (diffusion._check_finite); that says nothing of a real checkpoint, and the speed is the same, so here
    # such images are counted, not raised.
    bad_images = []
    diffusion._check_finite = lambda array, *_: bad_images.extend(
        i for i, im in enumerate(array) if np.isnan(im).any() or float(np.abs(im).max()) == 0.0)

    steps, size = smoke.cap("steps", part.steps), smoke.cap_size(part.size, part.size)[0]
    t0 = time.perf_counter()
    # 4-bit parts load as a notebook does (the fast path at its default); the 16-bit ones start plain
    pipe = helpers.load_sd(folder, quantization=part.quantization, profile=profile,
                           fast=False if part.fast_arm else None)
    load_s, rss_load = _now(cuda) - t0, peak_rss_mib() / 1024
    pipe.set_progress_bar_config(disable=True)
    route, quantization = route_of(pipe, "cuda" if cuda else "cpu")
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    ends = []   # the end of each denoiser call: one a step (classifier-free guidance batches both halves)
    denoiser.register_forward_hook(lambda *_: ends.append(_now(cuda)))

    def image():
        ends.clear()
        start = _now(cuda)
        result = helpers.generate(pipe, PROMPT, num_inference_steps=steps, guidance_scale=part.guidance, width=size,
                                  height=size, seed=SEED, progress=False)
        seconds = _now(cuda) - start
        its = (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else None
        return seconds, its, np.asarray(result.images[0]).astype(np.int16)

    arms = {"plain": lambda: plain_again(pipe), "fast": lambda: speed_up(pipe)} if part.fast_arm else {"default": None}
    first, peaks, pictures, times = {}, {}, {}, {name: [] for name in arms}
    for name, switch in arms.items():
        if name != next(iter(arms)) and cuda:
            torch.cuda.reset_peak_memory_stats()   # the first arm's peak includes the load
        if switch and name != "plain":
            switch()
        first[name], _, pictures[name] = image()
        peaks[name] = _vram(cuda)
    for _ in range(REPEATS):
        for name, switch in arms.items():
            if switch:
                switch()
            seconds, its, _ = image()
            times[name].append((seconds, its))
    for name in arms:
        s_image = statistics.median(s for s, _ in times[name])
        speeds = [i for _, i in times[name] if i]
        fast_path = ", ".join(getattr(pipe, "_helpers_fast", []) or []) if name != "plain" else ""
        note, diff = "", None
        if name == "fast":
            plain_s = statistics.median(s for s, _ in times["plain"])
            diff = float(np.abs(pictures["plain"] - pictures["fast"]).mean())
            note = f"{plain_s / s_image:.2f}x the plain s/image; image diff {diff:.2f}/255"
        if bad_images:
            note = "; ".join(filter(None, [note, f"{len(bad_images)} NaN/black images (random fp16 weights)"]))
        records.append({"arm": name + (f" ({fast_path})" if fast_path else ""),
                        "setting": f"{route}, {quantization}, {steps} steps, {size}x{size}",
                        "speed": statistics.median(speeds) if speeds else None, "unit": "it/s", "s_image": s_image,
                        "first_s": first[name], "load_s": load_s, "rss_load_gib": rss_load, "route": route,
                        "quantization": quantization, "image_diff": diff, "nan_images": len(bad_images),
                        "note": note, **peaks[name]})


def lora_trained(path) -> dict:
    """{projection: [moved, total]}: how many LoRA up (B) matrices of each projection left their zero start (one the
    forward never calls keeps its zeros: a fused QKV path would show here)."""
    from safetensors.torch import load_file

    counts = {}
    for key, tensor in load_file(str(path)).items():
        if not any(up in key for up in ("lora_B", "lora.up", "lora_up")):
            continue
        kind = next((k for k in ("to_q", "to_k", "to_v", "to_out") if k in key), "other")
        moved, total = counts.get(kind, (0, 0))
        counts[kind] = (moved + int(bool(tensor.abs().sum() > 0)), total + 1)
    return {k: list(v) for k, v in sorted(counts.items())}


def measure_train(part: Part, folder: str, cuda: bool, records: list) -> None:
    import itertools

    from helpers.training.loop import TrainConfig, train_lora

    train_bench = bench_module("train")
    size, optimizer, precision = part.size, "adamw8bit" if cuda else "adamw", "fp16" if cuda else "no"
    with tempfile.TemporaryDirectory(prefix="device-train-") as tmp:
        dataset = train_bench.make_dataset(Path(tmp) / "dataset", smoke.cap("size", size))
        config = TrainConfig(dataset=str(dataset), run_dir=str(Path(tmp) / "run"), base_model=folder,
                             resolution=size, batch_size=1, max_train_steps=part.steps, rank=16, alpha=16.0, seed=0,
                             gradient_checkpointing=True, optimizer=optimizer, mixed_precision=precision,
                             checkpoint_every=part.steps, keep_checkpoints=1, sample_every=0)
        ends = []
        t0 = time.perf_counter()
        with train_bench.step_clock(ends, cuda):
            result = train_lora(config, progress=False)
        run_s = time.perf_counter() - t0
        trained = lora_trained(result.lora_path)
    intervals = [b - a for a, b in itertools.pairwise(ends)]
    s_step = statistics.median(intervals) if intervals else None
    steps, size = result.steps, smoke.cap("size", size)
    records.append({"arm": f"LoRA r16, {precision}, {optimizer}, checkpointing",
             "setting": f"{size}x{size}, batch 1, {steps} steps", "speed": 1 / s_step if s_step else None,
             "unit": "steps/s", "s_image": None, "first_s": ends[0] - t0 if ends else None, "load_s": None,
             "rss_load_gib": None, "run_s": run_s, "lora_trained": trained,
             "note": "LoRA up matrices trained: " + ", ".join(f"{k} {m}/{t}" for k, (m, t) in trained.items()),
             **_vram(cuda)})


def drawn_image(height: int):
    """A 4:3 picture of a few coloured shapes, `height` px high. 4:3, as most photos: each budget then tiles it
    differently (a square image gets the same tokens at "low" and "medium", a 1x2 grid's padding being cut away)."""
    from PIL import Image, ImageDraw

    width = height * 4 // 3
    image = Image.new("RGB", (width, height), (230, 220, 200))
    draw = ImageDraw.Draw(image)
    for i, colour in enumerate([(200, 40, 40), (40, 160, 60), (40, 80, 200)]):
        box = [width * (1 + 3 * i) // 10, height // 4, width * (3 + 3 * i) // 10, height * 3 // 4]
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=colour)
    return image


def measure_llava(part: Part, folder: str, profile, cuda: bool, records: list) -> None:
    """One row a budget, each written as soon as it is measured (a later budget that runs out of memory leaves
    them)."""
    import torch

    from helpers.vlm import image_budget

    llava_bench = bench_module("llava")
    llava_bench.QUESTION = QUESTION
    t0 = time.perf_counter()
    model, processor = helpers.load_llava(folder, quantization=part.quantization, profile=profile)
    load_s, rss_load = _now(cuda) - t0, peak_rss_mib() / 1024
    image = drawn_image(2 * model.config.vision_config.image_size)   # 896x672: "high" is the 2x2 grid
    new_tokens = smoke.cap("max_new_tokens", part.steps)
    llava_bench.generate_once(model, processor, image, new_tokens)   # warm-up (peak includes the load)
    for budget in BUDGETS:
        with image_budget(model, processor, budget):
            runs = [llava_bench.generate_once(model, processor, image, new_tokens) for _ in range(LLAVA_RUNS)]
        prompt_tokens = runs[0][2]
        records.append({"arm": f"image budget {budget}", "setting": f"{part.quantization}, {prompt_tokens} prompt "
                        f"tokens, {new_tokens} new", "speed": statistics.median(r[1] for r in runs), "unit": "tok/s",
                        "s_image": None, "first_s": statistics.median(r[0] for r in runs), "load_s": load_s,
                        "rss_load_gib": rss_load, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                        "note": "first s = first-token latency", **_vram(cuda)})
        if cuda:
            torch.cuda.reset_peak_memory_stats()


def child_main(args) -> int:
    """Measure one part; write its records (or the error) as JSON to --result."""
    part, dry = PARTS[args.child], args.dry_run
    records, error = [], None
    try:
        if part.name in args.fail:
            raise RuntimeError(f"a planted failure (--fail {part.name})")
        if f"{part.name}:exit" in args.fail:
            os._exit(3)   # a crash: no result written
        runtime.quiet_logging()
        import torch

        from helpers import planner, registry

        cuda = not dry
        profile = None
        if cuda:
            torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * GIB / torch.cuda.mem_get_info()[1]))
            profile = planner.profile("t4")   # plans, dtype (fp16) and VAE slicing as on a T4
        # Workaround, for this script only: load_sd gives an SDXL in fp16 the fp16-fix VAE from the hub, which this
        # offline machine cannot reach; the random-weight folder's own VAE (same architecture) stands in.
        registry.SDXL_FP16_VAE = str(Path(args.folder) / "vae")
        import transformers  # imported before the load is timed

        if part.kind == "llava":
            transformers.LlavaNextForConditionalGeneration  # noqa: B018  (a lazy module: this imports it)
        else:
            import diffusers

            diffusers.AutoPipelineForText2Image  # noqa: B018
        if part.quantization != "none" or (cuda and part.kind == "train"):
            import bitsandbytes  # noqa: F401
        if part.kind == "generate":
            measure_generate(part, args.folder, profile, cuda, records)
        elif part.kind == "train":
            measure_train(part, args.folder, cuda, records)
        else:
            measure_llava(part, args.folder, profile, cuda, records)
    except Exception as e:
        from helpers import oom

        first = (str(e).strip().splitlines() or [""])[0][:200]
        error = (f"out of memory under the {CAP_GIB:g} GiB cap: {first}" if oom.is_oom(e)
                 else f"error: {type(e).__name__}: {first}")
        import traceback

        traceback.print_exc()
    peak = peak_rss_mib() / 1024
    Path(args.result).write_text(json.dumps({"records": [{**r, "peak_rss_gib": peak} for r in records],
                                             "error": error, "peak_rss_gib": peak}))
    return 1 if error else 0


# --- the parent: builds, runs the children, writes the page ---------------------------------------------------------

def run_child(part: Part, folder: Path, work: Path, limit: float, args) -> dict:
    """The child's result ({"records", "error"}), or a status of its own where it was killed or crashed."""
    result = work / f"{part.name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", part.name, "--folder", str(folder),
               "--result", str(result)] + ["--dry-run"] * args.dry_run + [f"--fail={f}" for f in args.fail]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # the child stays in this process group: whatever stops this run (a device call's time limit) stops it too
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    tail = deque(maxlen=20)

    def relay():
        for line in proc.stdout:
            print(f"  [{part.name}] {line}", end="", flush=True)
            tail.append(line.rstrip())

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join(5)
        return {"records": [], "error": f"killed: past its time limit of {limit:.0f} s"}
    reader.join(5)
    if result.is_file():
        return json.loads(result.read_text())
    how = (f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
           else f"exit code {proc.returncode}")
    last = next((line for line in reversed(tail) if line.strip()), "")
    return {"records": [], "error": f"crashed ({how})" + (f": {last[:200]}" if last else "")}


def _num(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def row(r: dict) -> str:
    vram = ("-" if r.get("peak_vram_alloc_gib") is None else
            f"{r['peak_vram_alloc_gib']:.2f} / {r['peak_vram_reserved_gib']:.2f}")
    speed = "-" if r.get("speed") is None else f"{r['speed']:.2f} {r['unit']}"
    status = r["status"] + (f"; {r['note']}" if r.get("note") else "") + (
        f"; {r['planner_note']}" if r.get("planner_note") else "")
    return (f"| {r['part']} | {r.get('arm', '-')} | {r.get('setting', '-')} | {speed} | {_num(r.get('s_image'), '.3f')} "
            f"| {_num(r.get('first_s'), '.3f')} | {_num(r.get('load_s'))} | {vram} | {_num(r.get('planner_vram_gib'))} "
            f"| {_num(r.get('rss_load_gib'))} | {_num(r.get('planner_ram_gib'))} | {_num(r.get('peak_rss_gib'))} "
            f"| {_num(r.get('part_s'), '.1f')} | {status} |")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with the tiny models (HELPERS_TINY=1)")
    parser.add_argument("--only", help=f"comma-separated parts, run in this order (default: all: {','.join(PARTS)})")
    parser.add_argument("--out", help="the results page (default: bench/results/gpu_<card>.md, gpu_dry-run.md)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds after which no part starts")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                        help="a part's own time limit, instead of its default")
    parser.add_argument("--fail", action="append", default=[], metavar="PART[:exit]",
                        help="make PART raise inside its child, or with :exit end it without a result (checks that a "
                        "failure is a row)")
    parser.add_argument("--work-dir", help="where the temporary checkpoints go (default: the system's temp folder)")
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [n.strip() for n in (args.only or ",".join(PARTS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        parser.error(f"unknown part {', '.join(map(repr, unknown)) or '(none given)'} in --only; known: "
                     f"{', '.join(PARTS)}")
    args.parts = [PARTS[n] for n in dict.fromkeys(names)]
    args.limits = {}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in PARTS or not re.fullmatch(r"\d+(\.\d+)?", seconds) or float(seconds) <= 0:
            parser.error(f"--limit {item!r} must be PART=SECONDS with PART one of {', '.join(PARTS)} and SECONDS > 0")
        args.limits[name] = float(seconds)
    for item in args.fail:
        if item.removesuffix(":exit") not in PARTS:
            parser.error(f"--fail {item!r} must name a part (optionally with :exit): {', '.join(PARTS)}")
    if not args.dry_run and not args.child and smoke.is_tiny():
        parser.error("HELPERS_TINY=1 is set, so every model would be tiny: unset it for the GPU run, or pass "
                     "--dry-run")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    command = command_line("bench/device_check.py", sys.argv[1:] if argv is None else argv)
    dry = args.dry_run
    if dry:
        smoke.use_tiny()                      # the children inherit it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing here needs the hub, and a device machine has no network
    runtime.quiet_logging()
    missing = [m for m in ("diffusers", "transformers", "peft", "accelerate") + ("bitsandbytes",) * (not dry)
               if not runtime.has_module(m)]
    if missing:
        raise ImportError(f"bench/device_check.py needs {', '.join(missing)}: pip install {' '.join(missing)} (on a "
                          "device machine, carry the wheels: see this script's docstring)")
    import torch

    if not dry and not torch.cuda.is_available():
        raise RuntimeError("No CUDA GPU here: bench/device_check.py measures a GPU; on a CPU run it with --dry-run.")
    card = "dry run" if dry else torch.cuda.get_device_name(0)
    out = Path(args.out or ROOT / "bench" / "results" / f"gpu_{card_slug(card)}.md")
    work = Path(tempfile.mkdtemp(prefix="device-check-", dir=args.work_dir))
    sources = {part.name: config_source(part, dry) for part in args.parts}
    built, records, start = {}, [], time.perf_counter()
    try:
        for i, part in enumerate(args.parts):
            t0 = time.perf_counter()
            left = args.budget - (t0 - start)
            source = sources[part.name]
            base = {"part": part.name, "model": part.model, "tiny": dry}
            try:
                base.update(predictions(part, source))
            except Exception as e:  # a planner failure is worth a row too, not the end of the run
                base["planner_note"] = f"planner failed: {type(e).__name__}: {e}"
            if left < MIN_PART_S:
                records.append({**base, "status": f"skipped: {max(left, 0):.0f} s of the {args.budget:.0f} s budget left "
                                f"(run it with --only {part.name})"})
                print(row(records[-1]), flush=True)
                continue
            error, build_s, child_rss = None, 0.0, None
            if source not in built:
                folder = work / f"model-{len(built)}"
                free, need = shutil.disk_usage(work).free, disk_needed(source)
                if free < 1.05 * need:
                    error = (f"skipped: its checkpoint needs {need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free "
                             "(--work-dir elsewhere)")
                else:
                    print(f"[{part.name}] building {part.model} with random weights in {folder} ...", flush=True)
                    try:
                        build(part, source, folder, dry)
                        built[source] = folder
                    except Exception as e:
                        shutil.rmtree(folder, ignore_errors=True)
                        error = f"build failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                        gc.collect()
                        if not dry:
                            torch.cuda.empty_cache()
                build_s = time.perf_counter() - t0
            left = args.budget - (time.perf_counter() - start)
            if error is None and left < MIN_PART_S:
                error = (f"skipped: its build took {build_s:.0f} s, leaving {max(left, 0):.0f} s of the "
                         f"{args.budget:.0f} s budget (run it with --only {part.name})")
            if error is None:
                limit = min(args.limits.get(part.name, part.limit_s), left)
                result = run_child(part, built[source], work, limit, args)
                error, child_rss = result["error"], result.get("peak_rss_gib")
                for r in result["records"]:
                    if part.kind == "llava" and r.get("prompt_tokens"):
                        r["planner_vram_gib"] = llava_prediction(source, r["prompt_tokens"], r["new_tokens"])
                    records.append({**base, **r, "status": "ok"})
            part_s = time.perf_counter() - t0
            if error:
                records.append({**base, "status": error, "peak_rss_gib": child_rss})
            for r in records:
                if r["part"] == part.name:
                    r.update(part_s=part_s, build_s=build_s)
                    print(row(r), flush=True)
            print(f"[{part.name}] {'ok' if not error else error.split(':')[0]} in {part_s:.1f} s (build "
                  f"{build_s:.1f} s); {time.perf_counter() - start:.0f} s of the {args.budget:.0f} s budget spent",
                  flush=True)
            later = {sources[p.name] for p in args.parts[i + 1:]}
            for key in [k for k in built if k not in later]:
                shutil.rmtree(built.pop(key), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total_s = time.perf_counter() - start
    sentence = DRY_SENTENCE if dry else None if "T4" in card else NOT_T4.format(card=card)
    work_lines = [
        f"Work: each model built with random weights from its {'tiny checkpoint' if dry else 'real'} architecture "
        f"({'fp32 on the CPU' if dry else 'fp16 on the GPU'}), saved to a temporary folder and measured in a child "
        "process of its own, which loads the folder as a notebook does: load_sd / load_llava with a T4 profile (its "
        "plan, fp16, VAE slicing), train_lora with the folder as base model"
        + ("." if dry else f", under torch.cuda.set_per_process_memory_fraction({CAP_GIB:g} GiB / the card)."),
        f"Prompt \"{PROMPT}\", seed {SEED}; the first image of each arm timed apart (first s), then {REPEATS} images "
        "an arm, the arms alternating (plain: load_sd(fast=False); fast: helpers.fast.speed_up on the same pipeline, "
        "undone for each plain image); medians. it/s is the denoiser's rate within an image; s/image the whole "
        "generate call. 4-bit parts load with quantization=\"4bit\" on the planner's route, the fast path at its "
        f"default. Training: {', '.join(f'{p.name} {p.steps} steps' for p in PARTS.values() if p.kind == 'train')} "
        "of LoRA rank 16 on 4 drawn images; steps/s from the end of the first step to the end of the last; first s "
        "= from the call to the end of the first step (load included). LLaVA: a drawn 4:3 picture, twice the vision "
        f"tower's size high, \"{QUESTION}\", greedy, exactly the new tokens shown; one warm-up answer, then "
        f"{LLAVA_RUNS} answers at each image budget (helpers.vlm.image_budget); first s = first-token latency "
        "(image processing included).",
        "Peak VRAM is torch's max_memory_allocated / max_memory_reserved (the first arm's includes the load; the "
        "CUDA context is not in it, the planner's figure includes its 0.5 GiB); peak RAM in load is the child's "
        "ru_maxrss right after loading, peak RAM at its end. Planner: helpers.planner.plan(model, \"t4\") at the "
        "part's size and quantization (its route in the JSON); for LLaVA, its estimate for the measured prompt and "
        "new tokens; for training, its full fine-tune estimate (it has no LoRA one).",
        f"Whole run: {total_s:.0f} s (budget {args.budget:.0f} s); each part's time (part s) includes building its "
        "checkpoint where it was not built already.",
    ]
    text = results_page(f"Device check: {card}", sentence, command,
                        machine(f"torch threads {torch.get_num_threads()}"),
                        versions("torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes"),
                        work_lines, HEADER, [row(r) for r in records], records)
    out.parent.mkdir(parents=True, exist_ok=True)
    helpers.atomic_write(out, text)
    print(text)
    print(f"Wrote {out}")
    return records


if __name__ == "__main__":
    code = main()
    sys.exit(code if isinstance(code, int) else 0)
