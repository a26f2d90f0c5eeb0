"""The memory planner's table: every registry model x every GPU profile -> verdict and plan (helpers.planner).

    python bench/plan_table.py            writes bench/results/plan_table.md and the table in README.md
    python bench/plan_table.py --counts   first recounts the parameters on the meta device (param_counts.json)
    python bench/plan_table.py --check    exits 1 where README.md's table differs from what this would write

Arithmetic from the real architectures, not measurements: weights are exact, activations estimates (the constants
at the top of helpers/planner.py say what they assume).
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers import planner, registry  # noqa: E402

README = ROOT / "README.md"
OUT = ROOT / "bench" / "results" / "plan_table.md"
START, END = "<!-- plan-table:start -->", "<!-- plan-table:end -->"


def cell(p: planner.Plan) -> str:
    """One plan as a table cell: the verdict, a pipeline's route on a GPU, the plan, the VRAM and RAM peaks."""
    if not p.fits:
        return f"**{p.verdict}**"
    route = f", route `{p.route}`" if p.pipeline and p.vram_total else ""
    peaks = (f"VRAM {p.vram_peak / planner.GIB:.1f}, " if p.vram_total else "") + f"RAM {p.ram_peak / planner.GIB:.1f}"
    return f"**{p.verdict}**{route}: {p.how()} ({peaks} GiB)"


def table() -> str:
    """The Markdown table: a row a model (parameters, 16-bit weights), a column a GPU profile (verdict, route; plan;
    peaks)."""
    gpus = list(planner.GPUS.values())
    lines = ["| model | params | 16-bit weights | " + " | ".join(g.label for g in gpus) + " |",
             "|---|---|---|" + "---|" * len(gpus)]
    for name in registry.MODELS:
        cells = [cell(planner.plan(name, g.key)) for g in gpus]
        lines.append(f"| {name} | {planner.total_params(name) / 1e9:.2f} B | "
                     f"{planner.weights_gib(name, 'bfloat16'):.1f} GiB | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def document() -> str:
    """bench/results/plan_table.md: the table, how it was made and what it assumes."""
    profiles = "\n".join(f"- {g.label}: {g.vram_gb} GiB VRAM, {g.ram_gb} GB RAM ({g.source})"
                         for g in planner.GPUS.values())
    return (f"# What fits where: the memory planner's table\n\nCommand: `python bench/plan_table.py` (no GPU, no "
            f"download: exact parameter counts of the real architectures in `assets/configs`, built on the meta "
            f"device). Default resolution of each pipeline (512 px for SD 1.5, 1024 px for the others), batch 1; "
            f"LLaVA: one image at its largest grid ({planner.LLAVA_IMAGE_TOKENS} tokens) + "
            f"{planner.LLAVA_TEXT_TOKENS} prompt + {planner.LLAVA_NEW_TOKENS} new tokens. A pipeline's route: `gpu` "
            f"(all on the GPU), `model_offload` (each model on the GPU while it runs, all weights in RAM) or `staged` "
            f"(the text encoders encode and are freed before the denoiser loads, with model offload); the first that "
            f"fits both VRAM and RAM, in that order, 16-bit before 4-bit. In brackets: the VRAM peak, activations and "
            f"{planner.CUDA_OVERHEAD_GIB} GiB of CUDA overhead included, and the RAM peak (loading, or running with "
            f"offload; the larger stage of a staged route).\n\n"
            f"{table()}\nProfiles:\n{profiles}\n\nEstimates, not measurements: weights are exact, activations follow "
            f"the constants at the top of `helpers/planner.py`. The T4 verdicts are checked against published "
            f"figures in `tests/test_planner.py`.\n")


def readme_with_table(text: str) -> str:
    if START not in text or END not in text:
        raise ValueError(f"README.md lacks the markers {START} and {END}: put them where the table goes.")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", action="store_true", help="recount parameters on the meta device first")
    parser.add_argument("--check", action="store_true", help="only check that README.md's table is current")
    args = parser.parse_args(argv)
    if args.check:
        current = README.read_text() == readme_with_table(README.read_text())
        print("README.md's plan table is current." if current else "README.md's plan table is stale: run "
              "python bench/plan_table.py")
        return 0 if current else 1
    if args.counts:
        planner.write_param_counts()
        print(f"counts: {planner.COUNTS_FILE}")
    OUT.write_text(document())
    README.write_text(readme_with_table(README.read_text()))
    print(f"table: {OUT} and {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
