"""Timings of SMOKE MODE on this machine: building each tiny model, loading it, and one generation.

    python bench/smoke_timings.py [--out bench/results/smoke_cpu.md]

What it shows is the cost of the CI path (tests and notebooks on tiny models), not the speed of any real model.
"""
import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["HELPERS_TINY"] = "1"

import helpers  # noqa: E402
from helpers import runtime, tiny  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "smoke_cpu.md"))
    args = parser.parse_args()
    runtime.quiet_logging()
    (torch, diffusers, transformers), t_import = timed(
        lambda: (__import__("torch"), __import__("diffusers"), __import__("transformers")))
    from PIL import Image

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in tiny.BUILDERS:
            folder, t_build = timed(lambda: tiny.build(key, Path(tmp) / key))
            size_mb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
            if key.startswith("llava"):
                (model, processor), t_load = timed(lambda: helpers.load_llava(str(folder)))
                _, t_run = timed(lambda: helpers.ask(model, processor, Image.new("RGB", (64, 48)), "What is this?",
                                                     max_new_tokens=16, min_new_tokens=16))
                work = "16 new tokens"
            else:
                task = "inpaint" if key.endswith("inpaint") else "txt2img"
                pipe, t_load = timed(lambda: helpers.load_sd(str(folder), task))
                pipe.set_progress_bar_config(disable=True)
                kwargs = dict(prompt="a photo of a cat", num_inference_steps=4, height=64, width=64,
                              generator=torch.Generator().manual_seed(0))
                if task == "inpaint":
                    kwargs.update(image=Image.new("RGB", (64, 64)), mask_image=Image.new("L", (64, 64), 255))
                _, t_run = timed(lambda: pipe(**kwargs))
                work = "64 px, 4 steps"
            rows.append(f"| {key} | {size_mb:.1f} | {t_build:.2f} | {t_load:.2f} | {t_run:.2f} ({work}) |")
    profile = runtime.detect_profile()
    text = "\n".join([
        "# SMOKE MODE timings (tiny random-weight models)",
        "",
        f"Command: `python bench/smoke_timings.py`. Machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, RAM {profile.ram_gb:.1f} GB, {runtime.describe(profile).split(' | ')[1]}; "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}.",
        f"Importing torch, diffusers and transformers: {t_import:.1f} s (once per process).",
        "",
        "| tiny model | size MB | build + save s | load s | run s |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "The first row also pays for the lazy imports inside diffusers and transformers. These are the costs of the",
        "CI path, not the speed of any real model.",
        "",
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    helpers.atomic_write(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
