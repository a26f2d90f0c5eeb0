"""Benchmarks: what the scripts in bench/ share (the machine they ran on, the library versions, peak memory), and
the model benchmark harness of notebook 08 and `python -m helpers bench`:

    harness   run_benchmark: the same prompts and seeds through each model; load time, time to first image, median
              seconds per image, it/s, peak VRAM and RAM, CLIP score (and FID/KID against a reference set)
    report    write_results: CSV, JSON, a Markdown table, plots (speed vs memory, quality) and an image grid per prompt
"""
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import sys

from .. import runtime

MIB = 2**20


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (ru_maxrss: kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (MIB if sys.platform == "darwin" else 1024)


def versions(*dists: str) -> dict[str, str]:
    """{distribution: version} ("absent" where not installed)."""
    out = {}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def machine(note: str = "") -> str:
    """One line: architecture, cores (with `note`), RAM and GPU, e.g. "x86_64, 2 cores, RAM 23.5 GB, no GPU"."""
    profile = runtime.detect_profile()
    cores = f"{os.cpu_count()} cores" + (f" ({note})" if note else "")
    return f"{platform.machine()}, {cores}, RAM {profile.ram_gb:.1f} GB, {runtime.describe(profile).split(' | ')[1]}"


def route_of(pipe, device: str) -> tuple[str, str]:
    """(route, quantization) that pipeline `pipe` was loaded by, as the results tables show them: what load_sd recorded
    (`pipe._helpers_route`, a memory.Route); else, for a pipeline built another way, the device where it is not
    "cuda", "model_offload" where diffusers' offload hooks are on and "gpu" otherwise, and the quantization its
    bitsandbytes layers show ("4bit", "8bit" or "none")."""
    route = getattr(pipe, "_helpers_route", None)
    if route is not None:
        return route.name, route.quantization
    layers = {type(m).__name__ for c in pipe.components.values() if hasattr(c, "modules") for m in c.modules()}
    quantization = "4bit" if "Linear4bit" in layers else "8bit" if "Linear8bitLt" in layers else "none"
    if device != "cuda":
        return device, quantization
    return ("model_offload" if getattr(pipe, "_all_hooks", None) else "gpu"), quantization


def command_line(script: str, argv=None) -> str:
    """The command that reproduces this run: the environment switches that matter, then `python script args`."""
    env = " ".join(f"{k}={os.environ[k]}" for k in ("HF_HUB_OFFLINE", "HELPERS_TINY") if os.environ.get(k))
    args = sys.argv[1:] if argv is None else argv
    return " ".join(filter(None, [env, "python", shlex.join([sys.argv[0] if argv is None else script, *args])]))


from .harness import SHAPE_TRUE_NOTE, BenchResult, load_prompts, run_benchmark  # noqa: E402
from .report import image_grid, markdown_table, write_results  # noqa: E402

__all__ = ["BenchResult", "SHAPE_TRUE_NOTE", "command_line", "image_grid", "load_prompts", "machine", "markdown_table",
           "peak_rss_mib", "route_of", "run_benchmark", "versions", "write_results"]


def results_page(title: str, tiny_sentence: str | None, command: str, machine_line: str, library_versions: dict,
                 work: list[str], header: str, rows: list[str], records: list[dict]) -> str:
    """A bench/results page: the title, a bold line where the figures come from tiny models, the command, the
    machine, what was measured (`work` lines), the Markdown table and one JSON object a row."""
    return "\n".join([
        f"# {title}", "",
        *([f"**{tiny_sentence}.**", ""] if tiny_sentence else []),
        f"Command: `{command}`.",
        f"Machine: {machine_line}; " + ", ".join(f"{d} {v}" for d, v in library_versions.items()) + ".",
        *work, "",
        header, "|" + "---|" * header.count(" | ") + "---|", *rows, "",
        "One JSON object a row:", "", *(f"    {json.dumps(r)}" for r in records), "",
    ])
