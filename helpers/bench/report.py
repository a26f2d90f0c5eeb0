"""A benchmark's results as files: results.csv, results.json, results.md (a Markdown table with the command, machine
and versions), speed_vs_memory.png, quality.png and grids/prompt_NN.png (the models side by side for each prompt).
Every file is written atomically (helpers.storage); the default folder is outputs/bench/<date-time> on Drive."""
import csv
import io
import json
import time
from pathlib import Path

from .. import storage
from .harness import ROW_KEYS

ROW_FIELDS = ROW_KEYS  # the CSV columns
TABLE = (("model", "model"), ("setting", "setting"), ("mode", "mode"), ("dtype", "dtype"), ("route", "route"),
         ("steps", "steps"),
         ("size", None), ("load s", "load_s"), ("first image s", "first_image_s"), ("s/image", "s_per_image"),
         ("it/s", "it_per_s"), ("peak VRAM MiB", "peak_vram_mib"), ("peak RAM MiB", "peak_ram_mib"),
         ("CLIP score", "clip_score"), ("FID", "fid"), ("KID", "kid"))


def cell_text(row: dict, key: str | None) -> str:
    """A row's figure as the table shows it: "-" where there is none."""
    if key is None:
        return "-" if row["width"] is None else f"{row['width']}x{row['height']}"
    if key == "route" and row.get("route") and row.get("quantization") not in (None, "none"):
        return f"{row['route']}, {row['quantization']}"  # e.g. "staged, 4bit"
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if key in ("kid", "fid") else f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows) -> str:
    """The rows as a Markdown table (one line a model and setting; "-" where a figure does not apply)."""
    lines = ["| " + " | ".join(title for title, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    lines += ["| " + " | ".join(cell_text(row, key) for _, key in TABLE) + " |" for row in rows]
    return "\n".join(lines)


def image_grid(images, labels, cell: int = 256, band: int = 20):
    """One row of `images`, each resized to `cell` x `cell` under a white band with its label: (n x cell) wide,
    (cell + band) high."""
    from PIL import Image, ImageDraw

    if len(images) != len(labels) or not images:
        raise ValueError(f"image_grid needs one label per image, and at least one image; got {len(images)} image(s) "
                         f"and {len(labels)} label(s).")
    grid = Image.new("RGB", (cell * len(images), cell + band), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels)):
        grid.paste(image.convert("RGB").resize((cell, cell)), (i * cell, band))
        draw.text((i * cell + 4, 4), str(label)[: cell // 7], fill="black")
    return grid


def _save_figure(figure, path: Path) -> Path:
    with storage.atomic_open(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100, bbox_inches="tight")   # a title longer than the axes kept whole
    return path


def plot_speed_vs_memory(rows, path: Path) -> Path:
    """Seconds per image against peak VRAM (peak RAM where no GPU was used), one labelled point a row."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's own plotting backend stays as it is

    rows = [r for r in rows if r["s_per_image"] is not None]
    vram = any(r["peak_vram_mib"] is not None for r in rows)
    key = "peak_vram_mib" if vram else "peak_ram_mib"
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for r in rows:
        x = (r[key] or 0) / 1024
        axes.scatter(x, r["s_per_image"])
        axes.annotate(f"{r['model']}" + ("" if r["setting"] == "default" else f" ({r['setting']})"),
                      (x, r["s_per_image"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("peak VRAM (GiB)" if vram else "peak RAM of the process (GiB; no GPU used)")
    axes.set_ylabel("seconds per image (median)")
    axes.set_title(f"speed against memory ({rows[0]['mode']}; lower left is better)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save_figure(figure, path)


def plot_quality(rows, path: Path) -> Path:
    """Mean CLIP score of each row as bars."""
    from matplotlib.figure import Figure

    rows = [r for r in rows if r["clip_score"] is not None]
    names = [r["model"] + ("" if r["setting"] == "default" else f"\n{r['setting']}") for r in rows]
    figure = Figure(figsize=(max(4, 1.2 * len(rows)), 3.5))
    axes = figure.subplots()
    bars = axes.bar(names, [r["clip_score"] for r in rows], color="tab:green")
    axes.bar_label(bars, fmt="%.1f")
    axes.set_ylabel("CLIP score (mean over the prompts)")
    axes.set_title(f"prompt adherence ({rows[0]['mode']}; higher is better)")
    figure.tight_layout()
    return _save_figure(figure, path)


def results_markdown(result) -> str:
    meta = result.meta
    lines = ["# Model benchmark", ""]
    if meta["note"]:
        lines += [f"**{meta['note']}.**", ""]
    lines += [f"Command: `{meta['command']}`.",
              f"Machine: {meta['machine']}; " + ", ".join(f"{d} {v}" for d, v in meta["versions"].items()) + ".",
              f"Date: {meta['date']}. Every model: the same {len(result.prompts)} prompts, prompt i with seed "
              f"{meta['seed']} + i; {meta['warmup']} warm-up run(s) after the load, then one timed image a prompt "
              "(device synchronised). route: how load_sd loaded the model (gpu: all on the GPU; model_offload; "
              "staged: the text encoders encode, then are freed before the denoiser loads; the CPU device), with "
              "its quantization where there is one. s/image: the median; it/s = steps / s/image (text encoding and "
              "VAE decoding included); first image s: the first, cold, image after the load (time to first image = "
              "load s + first image s); peak VRAM: max_memory_allocated, reset for every row; peak RAM: the process's "
              "resident memory, sampled." + (f" CLIP score: {meta['quality']}, 100 x cosine, mean over the prompts."
                                             if meta.get("quality") else "")
              + (f" CUDA memory capped at {meta['vram_cap_gib']} GiB." if meta.get("vram_cap_gib") else ""),
              "", markdown_table(result.rows), ""]
    lines += [f"**{r['model']} ({r['setting']}) failed:** {r['error']}" for r in result.rows if r.get("error")]
    lines += ["", "Prompts (seed):", ""]
    lines += [f"{i}. {p} ({s})" for i, (p, s) in enumerate(zip(result.prompts, result.seeds))]
    return "\n".join(lines) + "\n"


def write_results(result, folder=None, cell: int = 256) -> dict[str, Path]:
    """Write the result files into `folder` (default: outputs/bench/<date-time> of the project folder, on Drive on
    Colab). Returns {"csv", "json", "markdown", "speed_plot" (where a model ran), "quality_plot" (where there are
    scores), "grids"}."""
    folder = Path(folder) if folder else storage.project_paths().outputs / "bench" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({**row, "seeds": " ".join(map(str, row["seeds"]))})
    files["csv"] = storage.atomic_write(folder / "results.csv", buffer.getvalue())
    document = {"meta": result.meta, "prompts": result.prompts, "seeds": result.seeds, "rows": result.rows,
                "clip_scores": result.clip_scores}
    files["json"] = storage.atomic_write(folder / "results.json", json.dumps(document, indent=1) + "\n")
    files["markdown"] = storage.atomic_write(folder / "results.md", results_markdown(result))
    if any(r["s_per_image"] is not None for r in result.rows):
        files["speed_plot"] = plot_speed_vs_memory(result.rows, folder / "speed_vs_memory.png")
    if any(r["clip_score"] is not None for r in result.rows):
        files["quality_plot"] = plot_quality(result.rows, folder / "quality.png")
    grids = []
    names = list(result.images)
    for i in range(len(result.prompts) if names else 0):
        grid = image_grid([result.images[n][i] for n in names], names, cell=cell)
        path = folder / "grids" / f"prompt_{i:02d}.png"
        with storage.atomic_open(path, "wb") as f:
            grid.save(f, format="PNG")
        grids.append(path)
    files["grids"] = grids
    result.files = files
    return files
