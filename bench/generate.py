"""helpers.generate against the bare diffusers call it makes: seconds per image, it/s, overhead, load time, peak memory.

    python bench/generate.py [--models sd15 sdxl] [--samplers "Euler a" "DPM++ 2M Karras"] [--sizes 512]
                             [--steps 25] [--repeats 5] [--out bench/results/generate_cpu.md]

Each model is loaded once (timed). For each sampler and size, each arm runs once as a warm-up, then `--repeats` timed
runs alternate the arms (generate, bare, generate, bare ...) so that machine noise hits both; medians are reported.
The bare arm is `set_sampler` (untimed) and then the one `pipe(...)` call that generate makes, with the same seed.
Torch runs on the same, pinned, thread count for both arms. In SMOKE MODE steps and size are capped (helpers/smoke.py).
"""
import argparse
import gc
import statistics
import time
from pathlib import Path

import helpers
from helpers.bench import command_line, machine, peak_rss_mib, results_page, route_of, versions
from helpers import runtime, samplers, smoke

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a cat sitting on a windowsill, soft morning light"
SEED, CFG = 0, 7.0
TINY_SENTENCE = "tiny random-weight models: these figures are the cost of the test path, not the models' speed"
HEADER = "| model | route | sampler | steps | size | load s | generate s/img | generate it/s | bare s/img | " \
         "bare it/s | overhead ms | overhead % | noise ms | peak RSS MiB | peak CUDA MiB |"
MIB = 2**20



def measure(pipe, sampler, steps, size, repeats, cuda):
    """(generate seconds, bare seconds): the per-run times of each arm, warm-up excluded, runs alternated."""
    import torch

    def run_generate():
        helpers.generate(pipe, PROMPT, num_inference_steps=steps, guidance_scale=CFG, width=size, height=size,
                         seed=SEED, sampler=sampler, progress=False)

    def run_bare():
        pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=CFG, width=size, height=size,
             generator=[torch.Generator("cpu").manual_seed(SEED)], output_type="np")

    arms = {"generate": run_generate, "bare": run_bare}
    times = {name: [] for name in arms}
    for i in range(repeats + 1):  # i == 0: the warm-up of each arm
        for name, fn in arms.items():
            if name == "bare":
                samplers.set_sampler(pipe, sampler)  # the scheduler generate sets, outside the timer
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if i:
                times[name].append(time.perf_counter() - t0)
    return times["generate"], times["bare"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--samplers", nargs="+", default=["Euler a", "DPM++ 2M Karras"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512], help="square image sides in pixels")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each arm after one warm-up")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "generate_cpu.md"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"`--repeats` must be at least 1, not {args.repeats}.")
    command = command_line("bench/generate.py", argv)
    runtime.quiet_logging()
    import torch
    # diffusers and transformers import their modules lazily, on first use: do it here, not in the timed load
    from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401

    threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the same, pinned, for both arms
    profile = runtime.detect_profile()
    cuda = profile.device == "cuda"
    steps = smoke.cap("steps", args.steps)
    rows, records = [], []
    for model in args.models:
        helpers.resolve(model, task="txt2img")  # in SMOKE MODE this builds the tiny model: not timed
        t0 = time.perf_counter()
        pipe = helpers.load_sd(model)
        t_load = time.perf_counter() - t0
        pipe.set_progress_bar_config(disable=True)
        route, quantization = route_of(pipe, profile.device)  # what load_sd planned: gpu, staged, ..., or the CPU
        route_text = route if quantization == "none" else f"{route}, {quantization}"
        for sampler in args.samplers:
            for asked_size in args.sizes:
                size = smoke.cap_size(asked_size, asked_size)[0]
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                gen, bare = measure(pipe, sampler, steps, size, args.repeats, cuda)
                g, b = statistics.median(gen), statistics.median(bare)
                noise = max(statistics.stdev(gen), statistics.stdev(bare)) if args.repeats > 1 else None
                peak_cuda = torch.cuda.max_memory_allocated() / MIB if cuda else None
                record = {"model": model, "route": route, "quantization": quantization, "sampler": sampler,
                          "steps": steps, "asked_steps": args.steps, "size": size, "asked_size": asked_size,
                          "repeats": args.repeats, "threads": threads,
                          "load_s": round(t_load, 3), "generate_s": round(g, 4), "generate_it_s": round(steps / g, 2),
                          "bare_s": round(b, 4), "bare_it_s": round(steps / b, 2),
                          "overhead_ms": round((g - b) * 1000, 2), "overhead_pct": round((g - b) / b * 100, 2),
                          "noise_ms": None if noise is None else round(noise * 1000, 2),
                          "peak_rss_mib": round(peak_rss_mib()), "tiny": smoke.is_tiny(),
                          "peak_cuda_mib": None if peak_cuda is None else round(peak_cuda)}
                records.append(record)
                rows.append(f"| {model} | {route_text} | {sampler} | {steps} | {size}x{size} | {t_load:.2f} | "
                            f"{g:.4f} | {steps / g:.1f} | {b:.4f} | {steps / b:.1f} | {record['overhead_ms']:+.1f} | "
                            f"{record['overhead_pct']:+.1f} | {'-' if noise is None else f'{noise * 1000:.1f}'} | "
                            f"{record['peak_rss_mib']} | {'-' if peak_cuda is None else f'{peak_cuda:.0f}'} |")
                print(rows[-1], flush=True)
        del pipe
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    machine_line = machine(f"torch threads pinned at {threads}")
    library_versions = versions("torch", "diffusers", "transformers", "accelerate")
    capped = (f" SMOKE MODE caps the work at {smoke.LIMITS['steps']} steps and {smoke.LIMITS['size']} px (asked: "
              f"{args.steps} steps, {', '.join(f'{s} px' for s in args.sizes)}); the table shows what ran."
              if smoke.is_tiny() else "")
    within = [r for r in records if r["noise_ms"] is not None and abs(r["overhead_ms"]) <= r["noise_ms"]]
    overheads = sorted(r["overhead_ms"] for r in records)
    verdict = (f"Overhead of generate over the bare call: {overheads[0]:+.1f} to {overheads[-1]:+.1f} ms a run; "
               f"within noise (|overhead| at most the larger standard deviation of the two arms' runs) in "
               f"{len(within)} of {len(records)} rows." if args.repeats > 1 else
               "One repeat: no noise estimate, so the overhead cannot be judged against noise.")
    text = results_page(
        "helpers.generate vs the bare diffusers call: speed, overhead, load time, peak memory",
        TINY_SENTENCE if smoke.is_tiny() else None, command, machine_line, library_versions,
        [
            f"Work: \"{PROMPT}\", CFG {CFG}, seed {SEED}, one image a run. Each model loaded once (load s), by the "
            f"route load_sd planned for it (route); each arm "
            f"warmed up once, then {args.repeats} timed runs alternating generate and bare; s/img are medians, "
            f"it/s = steps / s. Overhead = generate - bare (medians); noise = the larger standard deviation of the "
            f"two arms' runs.{capped} Peak RSS is the process's so far (ru_maxrss, never goes down); peak CUDA is "
            "reset each row.",
            "", verdict], HEADER, rows, records)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    helpers.atomic_write(out, text)
    print(text)
    return records


if __name__ == "__main__":
    main()
