"""Training speed and memory: steps per second and peak memory of LoRA and DreamBooth runs of train_lora, per setting.

    python bench/train.py [--model sd15] [--kinds lora dreambooth] [--checkpointing on off] [--cache-latents on off]
                          [--optimizers adamw adamw8bit] [--batch-sizes 1 2] [--steps 20] [--resolution 512]
                          [--rank 16] [--mixed-precision auto] [--memory-fraction 0.19] [--threads N]
                          [--out bench/results/train_cpu.md]

After one untimed warm-up run (imports, first allocations), each setting (kind x batch size x gradient checkpointing
x latent caching x optimizer) is one fresh run of helpers.training.loop.train_lora in a temporary folder, on a dataset
of a few drawn images with captions. Kinds:
`lora` (the images' captions), `dreambooth` (LoRA-DreamBooth: one instance prompt, prior preservation with class
images from the base model, generated once and reused by every dreambooth setting) and `dreambooth-full` (the whole
UNet). Steps/s is timed from the end of the first step to the end of the last (the first step, the model load, class
images, latent caching, the last checkpoint and the export are outside it; `run s` is the whole call). On CUDA the peak
allocated memory is reset before each setting, and `--memory-fraction` caps what this process may allocate
(16 GB T4 on an 80 GB H100: 0.19), so a setting that would not fit a T4 fails here too (the row says OOM).
adamw8bit (bitsandbytes) runs on CUDA only. In SMOKE MODE steps and size are capped (helpers/smoke.py).
"""
import argparse
import contextlib
import gc
import itertools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import helpers
from helpers import runtime, smoke
from helpers.bench import command_line, machine, peak_rss_mib, results_page, versions

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("lora", "dreambooth", "dreambooth-full")
IMAGES = 4   # drawn training images (at least two batches of the largest batch size)
INSTANCE_PROMPT, CLASS_PROMPT, CLASS_IMAGES = "a photo of sks toy", "a photo of a toy", 4
COLOURS = [(200, 40, 40), (40, 160, 60), (40, 80, 200), (220, 180, 40)]
TINY_SENTENCE = "tiny random-weight models: these figures are the cost of the test path, not the models' speed"
HEADER = "| kind | batch | checkpointing | cache latents | optimizer | precision | steps | size | steps/s | s/step | " \
         "noise ms | images/s | run s | peak RSS MiB | peak CUDA MiB |"
MIB = 2**20
ON_OFF = {"on": True, "off": False}


def make_dataset(folder: Path, size: int, count: int = IMAGES) -> Path:
    """`count` drawn images (a coloured shape on a plain ground) with kohya-style .txt captions."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), COLOURS[(i + 2) % len(COLOURS)])
        draw = ImageDraw.Draw(image)
        box = [size // 6 + i * size // 24, size // 5, size - size // 5, size - size // 6 - i * size // 24]
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=COLOURS[i % len(COLOURS)], outline=(0, 0, 0),
                                                    width=max(1, size // 64))
        image.save(folder / f"toy_{i}.png")
        (folder / f"toy_{i}.txt").write_text(f"sks toy, a {'round' if i % 2 else 'square'} toy, plain background")
    return folder


@contextlib.contextmanager
def step_clock(times: list, cuda: bool):
    """Append the time at which each training step ends: train_lora logs each step's loss once, on the main process
    (loop.append_loss), after the optimizer step."""
    import torch

    from helpers.training import loop

    logged = loop.append_loss

    def timed(*args, **kwargs):
        logged(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    loop.append_loss = timed
    try:
        yield
    finally:
        loop.append_loss = logged


def run_setting(setting: dict, args, dataset: Path, work: Path, class_cache: Path, cuda: bool) -> dict:
    """One train_lora run of `setting`: its step times and peak memory."""
    import torch

    from helpers.training.loop import TrainConfig, train_lora

    kind = setting["kind"]
    run_dir = work / "runs" / "-".join(str(v) for v in setting.values())
    dreambooth = kind.startswith("dreambooth")
    if dreambooth and class_cache.is_dir():  # made by the first dreambooth run: not generated again
        shutil.copytree(class_cache, run_dir / "class_images")
    config = TrainConfig(
        dataset=str(dataset), run_dir=str(run_dir), base_model=args.model, resolution=args.resolution,
        batch_size=setting["batch"], max_train_steps=args.steps, rank=args.rank, alpha=float(args.rank),
        learning_rate=1e-4 if kind != "dreambooth-full" else 5e-6, seed=0, cache_latents=setting["cache_latents"],
        gradient_checkpointing=setting["checkpointing"], optimizer=setting["optimizer"],
        mixed_precision=args.mixed_precision, checkpoint_every=args.steps, keep_checkpoints=1,
        method="full" if kind == "dreambooth-full" else "lora",
        instance_prompt=INSTANCE_PROMPT if dreambooth else None, class_prompt=CLASS_PROMPT if dreambooth else None,
        num_class_images=CLASS_IMAGES)
    gc.collect()  # the previous run's models (or an out-of-memory run's remains) go before this one starts
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, error = [], None
    t0 = time.perf_counter()
    try:
        with step_clock(times, cuda):
            result = train_lora(config, progress=False)
        steps = result.steps
    except torch.cuda.OutOfMemoryError as e:  # the point of a memory cap: say which settings do not fit
        error, steps = f"out of memory: {str(e).splitlines()[0][:120]}", len(times)
    run_s = time.perf_counter() - t0
    if dreambooth and not class_cache.is_dir() and (run_dir / "class_images").is_dir():
        shutil.copytree(run_dir / "class_images", class_cache)
    shutil.rmtree(run_dir, ignore_errors=True)
    intervals = [b - a for a, b in itertools.pairwise(times)]
    return {"steps": steps, "intervals": intervals, "run_s": run_s, "error": error,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / MIB if cuda else None}


def dash(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def measure(settings, args, cuda: bool, precision: str, size: int) -> tuple[list, list]:
    """(table rows, JSON records): one train_lora run a setting."""
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        dataset = make_dataset(work / "dataset", args.resolution, max(IMAGES, 2 * max(args.batch_sizes)))
        helpers.resolve(args.model, task="txt2img")  # in SMOKE MODE this builds the tiny model: before any timing
        run_setting(settings[0], args, dataset, work, work / "class_images", cuda)  # warm-up: imports, first allocs
        for setting in settings:
            m = run_setting(setting, args, dataset, work, work / "class_images", cuda)
            intervals = m["intervals"]
            s_step = statistics.median(intervals) if intervals else None
            noise = statistics.stdev(intervals) if len(intervals) > 1 else None
            record = {**setting, "model": args.model, "precision": precision, "steps": m["steps"],
                      "asked_steps": args.steps, "size": size, "asked_size": args.resolution, "rank": args.rank,
                      "steps_per_s": round(1 / s_step, 3) if s_step else None,
                      "s_per_step": round(s_step, 4) if s_step else None,
                      "noise_ms": round(noise * 1000, 2) if noise is not None else None,
                      "images_per_s": round(setting["batch"] / s_step, 3) if s_step else None,
                      "run_s": round(m["run_s"], 2), "peak_rss_mib": round(peak_rss_mib()),
                      "peak_cuda_mib": None if m["peak_cuda_mib"] is None else round(m["peak_cuda_mib"]),
                      "error": m["error"], "tiny": smoke.is_tiny()}
            records.append(record)
            speed = "OOM" if m["error"] else dash(record["steps_per_s"], ".2f")
            rows.append(f"| {setting['kind']} | {setting['batch']} | {'on' if setting['checkpointing'] else 'off'} | "
                        f"{'on' if setting['cache_latents'] else 'off'} | {setting['optimizer']} | {precision} | "
                        f"{m['steps']} | {size}x{size} | {speed} | "
                        f"{dash(s_step, '.4f')} | {dash(record['noise_ms'], '.1f')} | "
                        f"{dash(record['images_per_s'], '.2f')} | {m['run_s']:.2f} | {record['peak_rss_mib']} | "
                        f"{dash(record['peak_cuda_mib'], 'd')} |")
            print(rows[-1], flush=True)
    return rows, records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", help="an sd15 or sdxl registry name, hub id or diffusers folder")
    parser.add_argument("--kinds", nargs="+", default=["lora", "dreambooth"], choices=KINDS)
    parser.add_argument("--checkpointing", nargs="+", default=["on", "off"], choices=ON_OFF,
                        help="gradient checkpointing")
    parser.add_argument("--cache-latents", nargs="+", default=["on", "off"], choices=ON_OFF)
    parser.add_argument("--optimizers", nargs="+", choices=("adamw", "adamw8bit"),
                        help="default: adamw, and adamw8bit on CUDA")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps a run (at least 3)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    parser.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "fp16", "bf16"),
                        help="auto: fp16 on a T4, bf16 from Ampere on, none on CPU; fp16 to mimic a T4 on an H100")
    parser.add_argument("--memory-fraction", type=float, help="cap this process's CUDA memory at this fraction of "
                        "the GPU (torch.cuda.set_per_process_memory_fraction): 0.19 of 80 GB is a T4's 15 GB")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice); on a CPU that "
                        "other processes share, 1 gives steadier timings")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_cpu.md"))
    args = parser.parse_args(argv)
    command = command_line("bench/train.py", argv)
    runtime.quiet_logging()
    import torch

    profile = runtime.detect_profile()
    cuda = profile.device == "cuda"
    if args.steps < 3:
        raise ValueError(f"`--steps` must be at least 3 (steps/s is timed between the first and the last step), "
                         f"not {args.steps}.")
    if min(args.batch_sizes) < 1:
        raise ValueError(f"`--batch-sizes` must be positive integers, not {args.batch_sizes}.")
    optimizers = args.optimizers or (["adamw", "adamw8bit"] if cuda else ["adamw"])
    if "adamw8bit" in optimizers and not cuda:
        raise ValueError("`--optimizers adamw8bit` needs a CUDA GPU (bitsandbytes' 8-bit AdamW); here use adamw.")
    if args.memory_fraction is not None:
        if not cuda:
            raise ValueError(f"`--memory-fraction {args.memory_fraction}` caps CUDA memory, and this machine has no "
                             "CUDA GPU: leave it out.")
        if not 0 < args.memory_fraction <= 1:
            raise ValueError(f"`--memory-fraction` must be in (0, 1], not {args.memory_fraction}: e.g. 0.19 caps an "
                             "80 GB GPU at a T4's 15 GB.")
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"`--threads` must be a positive integer, not {args.threads}.")
    size = smoke.cap("size", args.resolution)
    precision = args.mixed_precision if args.mixed_precision != "auto" else (
        "bf16" if cuda and profile.native_bf16 else "fp16" if cuda else "no")
    settings = [{"kind": k, "batch": b, "checkpointing": ON_OFF[c], "cache_latents": ON_OFF[cache], "optimizer": o}
                for k, b, c, cache, o in itertools.product(args.kinds, args.batch_sizes, args.checkpointing,
                                                        args.cache_latents, optimizers)]
    load_start = os.getloadavg()[0]
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:  # a caller's own thread count comes back afterwards (the test runs main in pytest)
        threads = torch.get_num_threads()
        rows, records = measure(settings, args, cuda, precision, size)
    finally:
        torch.set_num_threads(threads_before)
    load_end = os.getloadavg()[0]

    cores = os.cpu_count() or 1
    machine_line = machine(f"torch threads {threads}")
    library_versions = versions("torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes")
    capped = (f" SMOKE MODE caps the work at {smoke.LIMITS['train_steps']} steps and {smoke.LIMITS['size']} px (asked: "
              f"{args.steps} steps, {args.resolution} px); the table shows what ran." if smoke.is_tiny() else "")
    busy = (f" **The machine was shared while this ran (1-minute load average {load_start:.1f} at the start, "
            f"{load_end:.1f} at the end, on {cores} cores): the timings are noisy; compare rows, not runs.**"
            if max(load_start, load_end) > 0.5 * cores else
            f" Load average {load_start:.1f} at the start, {load_end:.1f} at the end, on {cores} cores.")
    if args.threads is not None:
        busy += (f" torch ran on {args.threads} thread{'s' if args.threads > 1 else ''} (--threads): where other "
                 "processes share the cores, fewer threads keep a step from waiting on a busy one.")
    cap_line = (f" CUDA memory capped at {args.memory_fraction} of the GPU (--memory-fraction)."
                if args.memory_fraction else "")
    images = max(IMAGES, 2 * max(args.batch_sizes))
    text = results_page(
        "Training: steps per second and peak memory of LoRA and DreamBooth runs, per setting",
        TINY_SENTENCE if smoke.is_tiny() else None, command, machine_line, library_versions,
        [(f"Work: model {args.model}, {images} drawn images with captions, LoRA rank {args.rank} (alpha = rank) on "
         f"the UNet's attention; one untimed warm-up run, then one fresh train_lora run a setting. dreambooth: "
         f"instance prompt \"{INSTANCE_PROMPT}\", prior preservation with \"{CLASS_PROMPT}\" images (each batch holds "
         f"as many class images as instance images). s/step is the median time of a step from the end of the first "
         f"to the end of the last (load, class images, latent caching, final checkpoint and export excluded); "
         f"steps/s = 1 / s/step; noise = the standard deviation of the step times; images/s = batch x steps/s "
         f"(instance images); run s = the whole train_lora call.{capped} Peak RSS is the process's so far "
         f"(ru_maxrss, never goes down); peak CUDA (max_memory_allocated) is reset each row.{cap_line}{busy}")],
        HEADER, rows, records)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    helpers.atomic_write(out, text)
    print(text)
    return records


if __name__ == "__main__":
    main()
