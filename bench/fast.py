"""The fast path (helpers.fast) against the plain pipeline: seconds per image, the speed-up, and how far the images
differ, measured in one run with the arms interleaved.

    python bench/fast.py [--models sd15 sdxl] [--size 512] [--steps 25] [--repeats 5] [--compile] [--step-cache]
                         [--out bench/results/fast_cpu.md]

Each model is loaded twice, plain (fast=False) and fast (fast=True, with --compile / --step-cache), both held in
memory. Each arm's first image is timed apart (compile's warm-up lands there), then `--repeats` timed runs alternate
plain, fast, plain, fast ... with the same seed; medians are reported, speed-up = plain / fast. The difference is
the mean absolute difference of the two arms' images in levels of 255 (the fast path without compile and the step
cache paints the plain image within fp rounding; the step cache does not). bench/generate.py measures the overhead
of helpers.generate over the bare call; this script measures what the fast path buys.
"""
import argparse
import gc
import statistics
import time
from pathlib import Path

import numpy as np

import helpers
from helpers import runtime, smoke
from helpers.bench import command_line, machine, results_page, route_of, versions

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a cat sitting on a windowsill, soft morning light"
SEED = 0
TINY_SENTENCE = "tiny random-weight models: these figures are the cost of the test path, not the models' speed"
HEADER = ("| model | route | fast path | steps | size | plain first s | fast first s | plain s/img | fast s/img | "
          "speed-up | image diff /255 |")


def run(pipe, steps, size, cuda):
    """(seconds, the image as an array) of one generate call."""
    import torch

    t0 = time.perf_counter()
    result = helpers.generate(pipe, PROMPT, num_inference_steps=steps, width=size, height=size, seed=SEED,
                              progress=False)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, np.asarray(result.images[0]).astype(np.int16)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sd15"])
    parser.add_argument("--size", type=int, default=512, help="square image side in pixels")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each arm after its first image")
    parser.add_argument("--compile", action="store_true", help="the fast arm also compiles its denoiser")
    parser.add_argument("--step-cache", action="store_true", help="the fast arm also caches steps (FLUX, SD3)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fast_cpu.md"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"`--repeats` must be at least 1, not {args.repeats}.")
    command = command_line("bench/fast.py", argv)
    runtime.quiet_logging()
    import torch

    cuda = runtime.detect_profile().device == "cuda"
    steps, size = smoke.cap("steps", args.steps), smoke.cap_size(args.size, args.size)[0]
    rows, records = [], []
    for model in args.models:
        arms = {"plain": helpers.load_sd(model, fast=False),
                "fast": helpers.load_sd(model, fast=True, compile=args.compile, step_cache=args.step_cache)}
        for pipe in arms.values():
            pipe.set_progress_bar_config(disable=True)
        first, times, images = {}, {name: [] for name in arms}, {}
        for name, pipe in arms.items():
            first[name], images[name] = run(pipe, steps, size, cuda)
        for _ in range(args.repeats):
            for name, pipe in arms.items():
                times[name].append(run(pipe, steps, size, cuda)[0])
        plain, quick = statistics.median(times["plain"]), statistics.median(times["fast"])
        diff = float(np.abs(images["plain"] - images["fast"]).mean())
        route, quantization = route_of(arms["fast"], "cuda" if cuda else "cpu")
        path = ", ".join(arms["fast"]._helpers_fast)
        record = {"model": model, "route": route, "quantization": quantization, "fast_path": path, "steps": steps,
                  "size": size, "repeats": args.repeats, "plain_first_s": round(first["plain"], 3),
                  "fast_first_s": round(first["fast"], 3), "plain_s": round(plain, 4), "fast_s": round(quick, 4),
                  "speed_up": round(plain / quick, 3), "image_diff": round(diff, 3), "tiny": smoke.is_tiny()}
        records.append(record)
        rows.append(f"| {model} | {route} | {path} | {steps} | {size}x{size} | {first['plain']:.2f} | "
                    f"{first['fast']:.2f} | {plain:.4f} | {quick:.4f} | {plain / quick:.2f}x | {diff:.2f} |")
        print(rows[-1], flush=True)
        del arms
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    text = results_page(
        "The fast path against the plain pipeline: seconds per image, speed-up, image difference",
        TINY_SENTENCE if smoke.is_tiny() else None, command, machine(f"torch threads {torch.get_num_threads()}"),
        versions("torch", "diffusers"),
        [f"Work: \"{PROMPT}\", seed {SEED}, one image a run; the first image of each arm timed apart, then "
         f"{args.repeats} runs alternating plain and fast; medians."], HEADER, rows, records)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    helpers.atomic_write(out, text)
    print(text)
    return records


if __name__ == "__main__":
    main()
