"""The model benchmark (helpers.bench) run from a shell, its report committed to bench/results/.

    python bench/models.py [--tiny sd15 sdxl sd3-medium flux-schnell] [--shape-true sd15] [--shape-true-size 256]
                           [--shape-true-steps 2] [--prompts 2] [--threads 1]
                           [--out bench/results/models_cpu.md]

Two parts, each its own table: (1) the tiny random-weight models of each family in SMOKE MODE (the cost of the code
path, not the models' speed); (2) with --shape-true, the real-size architectures with random weights, outside SMOKE
MODE, at the size and steps given (real speed and memory on this machine, no quality). Every model gets the same
prompts (the first --prompts of assets/prompts) and seeds. Pass `--shape-true` with no model to skip part 2.
"""
import argparse
import os
from pathlib import Path

from helpers import bench, runtime, smoke, storage
from helpers.bench import report

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", nargs="*", default=["sd15", "sdxl", "sd3-medium", "flux-schnell"])
    parser.add_argument("--shape-true", nargs="*", default=["sd15"])
    parser.add_argument("--shape-true-size", type=int, default=256)
    parser.add_argument("--shape-true-steps", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=2, help="how many of the prompt set to use")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier where others share the "
                                                               "cores; 2 OpenMP threads on 2 busy cores ran 10-40x "
                                                               "slower here)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "models_cpu.md"))
    args = parser.parse_args(argv)
    command = bench.command_line("bench/models.py", argv)
    runtime.quiet_logging()
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    prompts = bench.load_prompts()[:args.prompts]
    load = os.getloadavg()[0]
    sections = []
    was_tiny = smoke.is_tiny()
    try:
        if args.tiny:
            smoke.use_tiny(True)
            result = bench.run_benchmark(args.tiny, prompts=prompts, warmup=args.warmup, command=command)
            sections.append(("Tiny models (SMOKE MODE)", result))
        if args.shape_true:
            smoke.use_tiny(False)  # the real sizes: no SMOKE MODE caps
            setting = {"num_inference_steps": args.shape_true_steps, "size": args.shape_true_size}
            result = bench.run_benchmark(args.shape_true, prompts=prompts, settings=[setting], warmup=args.warmup,
                                         shape_true=True, command=command)
            sections.append((f"Shape-true (real-size architectures, random weights) at {args.shape_true_size} px, "
                             f"{args.shape_true_steps} steps", result))
    finally:
        smoke.use_tiny(was_tiny)
        torch.set_num_threads(threads)
    parts = ["# Model benchmark on this machine (CPU)", "",
             f"Command: `{command}` (each part below repeats it with its own settings).",
             f"Torch threads: {args.threads}. Load average when it started: {load:.1f} on {os.cpu_count()} cores "
             "(other processes shared them: read the timings as rough).", ""]
    for title, result in sections:
        body = report.results_markdown(result).split("\n", 2)[2]  # without its own title line
        parts += [f"## {title}", "", body]
    text = "\n".join(parts)
    storage.atomic_write(Path(args.out), text)  # only this report is committed, not the per-run files
    print(text)
    return sections


if __name__ == "__main__":
    main()
