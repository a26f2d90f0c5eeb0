"""The model benchmark: every model gets the same prompts and the same seeds, and is measured the same way.

For each model: the load (timed; the route load_sd planned for it, e.g. "staged" with "4bit", is in its rows), then
for each setting one first image (cold: time to first image = load + first
image), `warmup` - 1 more warm-up runs, then one timed image per prompt (prompt i with seed + i), with the device
synchronised before each clock reading. Reported: median seconds per image and it/s (steps / median seconds; it
includes text encoding and VAE decoding, as a user waits for them), peak VRAM (torch.cuda.max_memory_allocated, reset
for every row) and peak RAM (resident memory sampled in a thread: ru_maxrss never goes down, so it cannot give one
model's peak). Each model is freed before the next is loaded. Then the quality scores: CLIP score of every image with
its prompt and, given a reference set of images, FID and KID against it (helpers.quality).

Shape-true mode builds the real-size architectures with random weights (helpers.planner.build_shape_true): the speed
and memory are the real models', the images are noise, so no quality is computed and the results say so.
"""
import csv
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import registry, runtime, smoke, storage

PROMPTS_FILE = storage.ASSETS / "prompts" / "partiprompts_12.tsv"
SHAPE_TRUE_NOTE = "random weights: speed and memory only"
TINY_NOTE = "tiny random-weight models: the figures are the cost of the code path, not the models' speed or quality"
MIB = 2**20

SETTING_KEYS = ("label", "num_inference_steps", "size", "guidance_scale", "sampler")
# The figures of a row (helpers.bench.report writes them in this order); None where one does not apply.
ROW_KEYS = ("model", "setting", "family", "mode", "dtype", "device", "route", "quantization", "steps", "width",
            "height", "guidance_scale", "sampler", "images", "warmup", "load_s", "first_image_s", "s_per_image",
            "s_per_image_min", "s_per_image_max", "it_per_s", "peak_vram_mib", "peak_ram_mib", "clip_score", "fid",
            "kid", "kid_std", "seeds", "error")


@dataclass
class BenchResult:
    rows: list[dict]                 # one a (model, setting): the figures (see ROW_FIELDS in report)
    prompts: list[str]
    seeds: list[int]                 # seeds[i] goes with prompts[i], for every model
    images: dict[str, list]          # row name ("model" or "model / setting") -> one image a prompt
    meta: dict                       # machine, versions, mode, note, command, date
    clip_scores: dict[str, list] = field(default_factory=dict)  # row name -> one score a prompt
    files: dict[str, Path] = field(default_factory=dict)         # what write_results wrote


def load_prompts(path=PROMPTS_FILE) -> list[str]:
    """The `Prompt` column of a TSV/CSV file (the default: twelve PartiPrompts, assets/prompts), or a .txt file's
    non-empty lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No prompt file at {path}: pass a .tsv/.csv with a `Prompt` column or a .txt file "
                                "with one prompt a line.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix == ".tsv" else ","))
    if not rows or "Prompt" not in rows[0]:
        raise ValueError(f"{path} has no `Prompt` column (columns: {', '.join(rows[0]) if rows else 'none'}).")
    return [row["Prompt"] for row in rows if row["Prompt"].strip()]


class RamPeak:
    """The peak resident memory (MiB) of this process, sampled every `interval` seconds in a background thread."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._process, self._interval = psutil.Process(), interval
        self._peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def take(self) -> float:
        """The peak since the start or the last take, in MiB; then start again from the present."""
        peak = max(self._peak, self._process.memory_info().rss)
        self._peak = self._process.memory_info().rss
        return peak / MIB

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _check_settings(settings) -> list[dict]:
    settings = [dict(s) for s in (settings or [{}])]
    for s in settings:
        unknown = set(s) - set(SETTING_KEYS)
        if unknown:
            raise ValueError(f"Unknown setting key(s) {sorted(unknown)} in {s}; known: {', '.join(SETTING_KEYS)}.")
        for key, low, high in (("num_inference_steps", 1, 500), ("size", 64, 4096)):
            value = s.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high
                                      or value % (8 if key == "size" else 1)):
                rule = "a multiple of 8 from 64 to 4096 pixels" if key == "size" else "an integer from 1 to 500"
                raise ValueError(f"`{key}` in setting {s} must be {rule}, not {value!r}.")
        scale = s.get("guidance_scale")
        if scale is not None and not (isinstance(scale, (int, float)) and 0 <= scale <= 30):
            raise ValueError(f"`guidance_scale` in setting {s} must be between 0 and 30, not {scale!r}.")
    labels = [_label(s) for s in settings]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Two settings share a label ({labels}): give each a different `label`.")
    return settings


def check_reference(reference, name: str = "`reference`") -> None:
    """Raise where `reference` (a folder of images, for FID and KID) is missing, not a folder, or holds fewer than 2
    images; a list of images is taken as it is."""
    from .. import images as imaging

    if reference is None or isinstance(reference, (list, tuple)):
        return
    folder = Path(reference).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{name} {str(folder)!r} does not exist: pass a folder of reference images (FID and "
                                "KID compare the generated images against them), or leave it out.")
    if not folder.is_dir():
        raise ValueError(f"{name} {str(folder)!r} is a file, not a folder: put the reference images in a folder and "
                         "pass that folder.")
    count = len(imaging.list_images(folder))
    if count < 2:
        raise ValueError(f"{name} {str(folder)!r} holds {count} image(s); FID and KID need at least 2: add images, or "
                         "leave it out.")


def _label(setting: dict) -> str:
    if "label" in setting:
        return str(setting["label"])
    parts = [f"{k.replace('num_inference_steps', 'steps')}={v}" for k, v in setting.items()]
    return ", ".join(parts) or "default"


def _row_name(model: str, setting: dict, several: bool) -> str:
    return f"{model} / {_label(setting)}" if several else model


def generation_kwargs(model: str, family: str, setting: dict) -> dict:
    """The generate() arguments of `setting` for `model`: its family's defaults, then the setting's values."""
    from .. import diffusion

    merged = {**diffusion.recommended_settings(family, model),
              **{k: v for k, v in setting.items() if k != "label" and v is not None}}
    size = merged.pop("size")
    return {**merged, "width": size, "height": size}


def _build_shape_true(name: str, dtype, device: str):
    """A pipeline of the real-size architecture of `name` with random weights (helpers.planner)."""
    try:
        from .. import planner
    except ImportError:
        planner = None
    build = getattr(planner, "build_shape_true", None)
    if build is None:
        raise RuntimeError("Shape-true mode needs helpers.planner.build_shape_true, which this version lacks: "
                           "update the project (git pull), or run without --shape-true.")
    return build(name, dtype, device)


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _generate(pipe, prompt: str, seed: int, model: str, kwargs: dict, cuda: bool):
    """One image, the device synchronised before returning (so the clock reads finished work)."""
    from .. import diffusion

    out = diffusion.generate(pipe, prompt, seed=seed, model_name=model, progress=False, **kwargs)
    _sync(cuda)
    return out


def _import_lazy_modules() -> None:
    """diffusers and transformers import their modules on first use: done here, not in the timed load."""
    import diffusers
    import transformers

    for name in ("AutoPipelineForText2Image", *registry.PIPELINE_FAMILIES):
        getattr(diffusers, name)
    for name in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "CLIPTokenizer"):
        getattr(transformers, name)


def _measure(pipe, model, family, setting, prompts, seeds, warmup, cuda) -> tuple[dict, list]:
    """(the row's timings and settings, one image a prompt): a first (cold) image, warmup - 1 more warm-ups, then one
    timed image a prompt."""
    kwargs = generation_kwargs(model, family, setting)
    if smoke.is_tiny():  # capped here once (with its notice), not in every generate call
        kwargs["num_inference_steps"] = smoke.cap("steps", kwargs["num_inference_steps"])
        kwargs["width"], kwargs["height"] = smoke.cap_size(kwargs["width"], kwargs["height"])
    t0 = time.perf_counter()
    first = _generate(pipe, prompts[0], seeds[0], model, kwargs, cuda)
    first_image_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        _generate(pipe, prompts[0], seeds[0], model, kwargs, cuda)
    times, made = [], []
    for i in range(len(prompts)):
        if i == 0 and warmup == 0:  # no warm-up: the first image is the first timed one
            times.append(first_image_s)
            made.append(first.images[0])
            continue
        t0 = time.perf_counter()
        made.append(_generate(pipe, prompts[i], seeds[i], model, kwargs, cuda).images[0])
        times.append(time.perf_counter() - t0)
    median, steps = statistics.median(times), int(first.settings["Steps"])
    width, height = (int(v) for v in first.settings["Size"].split("x"))
    row = {**dict.fromkeys(ROW_KEYS), "model": model, "setting": _label(setting), "family": family,
           "dtype": str(pipe.dtype).replace("torch.", ""), "steps": steps, "width": width, "height": height,
           "guidance_scale": kwargs["guidance_scale"], "sampler": first.settings["Sampler"], "images": len(made),
           "warmup": warmup, "first_image_s": round(first_image_s, 4), "s_per_image": round(median, 4),
           "s_per_image_min": round(min(times), 4), "s_per_image_max": round(max(times), 4),
           "it_per_s": round(steps / median, 3), "seeds": list(seeds)}
    return row, made


def _progress_line(name: str, r: dict) -> str:
    return (f"{name}: load {r['load_s']:.2f} s, first image {r['first_image_s']:.2f} s, {r['s_per_image']:.3f} "
            f"s/image ({r['it_per_s']:.2f} it/s), peak RAM {r['peak_ram_mib']} MiB"
            + (f", peak VRAM {r['peak_vram_mib']} MiB" if r["peak_vram_mib"] is not None else ""))


def run_benchmark(models, prompts=None, seed: int = 0, settings=None, warmup: int = 1, shape_true: bool = False,
                  quality: bool = True, clip=None, reference=None, progress: bool = True,
                  command: str | None = None, vram_cap_gib: float | None = None) -> BenchResult:
    """Benchmark `models` (registry names, hub ids or folders; in SMOKE MODE the tiny models) on the same `prompts`
    (default: assets/prompts) and seeds (prompt i: seed + i), for each of `settings` (dicts of label,
    num_inference_steps, size, guidance_scale, sampler; default: each model's usual settings). `clip`: a (model,
    processor) for the CLIP score (default: quality.load_clip()); `reference`: a folder or list of images to compute
    FID and KID against. `command`: how to repeat the run, for the report (default: this process's command line).
    `vram_cap_gib`: on a larger GPU, cap this process's CUDA memory to a smaller card's (15 for a T4's usable 15 GiB).
    Returns a BenchResult; write it with write_results."""
    import torch
    from accelerate.utils.memory import clear_device_cache

    from .. import diffusion, loading
    from . import command_line, machine, route_of, versions

    models = [models] if isinstance(models, str) else list(models)
    if not models:
        raise ValueError("`models` is empty: name at least one, e.g. ['sd15', 'sdxl'].")
    if len(set(models)) != len(models):
        raise ValueError(f"`models` names a model twice: {models}.")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"`warmup` must be 0 or more runs, not {warmup!r}.")
    prompts = load_prompts() if prompts is None else [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"`prompts` must be non-empty strings, not {prompts!r}.")
    settings = _check_settings(settings)
    if quality and not shape_true:
        check_reference(reference)
    several = len(settings) > 1
    seeds = [(seed + i) % (diffusion.MAX_SEED + 1) for i in range(len(prompts))]
    profile = runtime.detect_profile()
    cuda = profile.device == "cuda"
    dtype = runtime.pick_dtype(profile)
    mode = "shape-true" if shape_true else "tiny" if smoke.is_tiny() else "real"
    # a link is downloaded first (never timed as loading); every name is checked (and a tiny model built) before
    # anything is loaded or timed
    from .. import models as model_files

    models = [str(model_files.download(m, kind="checkpoint")) if model_files.is_link(m) else m for m in models]
    families = {m: None if shape_true else registry.resolve(m, task="txt2img").family for m in models}
    if vram_cap_gib is not None:
        if not cuda:
            print(f"vram_cap_gib={vram_cap_gib}: no CUDA GPU here, so there is no VRAM to cap.")
        else:  # allocations past the cap raise torch.OutOfMemoryError, as on the smaller card
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, vram_cap_gib * 2**30 / total))
    _import_lazy_modules()
    rows, images = [], {}
    for model in models:
        clear_device_cache(garbage_collection=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            with RamPeak() as ram:
                t0 = time.perf_counter()
                pipe = _build_shape_true(model, dtype, profile.device) if shape_true else loading.load_sd(model)
                _sync(cuda)
                load_s = time.perf_counter() - t0
                pipe.set_progress_bar_config(disable=True)
                route, quantization = route_of(pipe, profile.device)  # what load_sd chose (memory.sd_route)
                family = families[model] or diffusion.family_of(pipe)
                for setting in settings:
                    row, made = _measure(pipe, model, family, setting, prompts, seeds, warmup, cuda)
                    row.update(mode=mode, device=profile.device, route=route, quantization=quantization,
                               load_s=round(load_s, 4),
                               peak_ram_mib=round(ram.take()),
                               peak_vram_mib=round(torch.cuda.max_memory_allocated() / MIB) if cuda else None)
                    rows.append(row)
                    images[_row_name(model, setting, several)] = made
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    if progress:
                        print(_progress_line(_row_name(model, setting, several), row), flush=True)
        except (OSError, RuntimeError, ValueError, MemoryError) as e:  # the next models still run; the error is kept
            message = f"{type(e).__name__}: {e}"
            print(f"{model}: FAILED, {message}", flush=True)
            done = {r["setting"] for r in rows if r["model"] == model}
            rows += [{**dict.fromkeys(ROW_KEYS), "model": model, "setting": _label(s), "mode": mode,
                      "device": profile.device, "seeds": list(seeds), "error": message}
                     for s in settings if _label(s) not in done]
        pipe = None
        clear_device_cache(garbage_collection=True)  # this model leaves before the next one arrives

    note = SHAPE_TRUE_NOTE if shape_true else TINY_NOTE if mode == "tiny" else ""
    meta = {"mode": mode, "note": note, "machine": machine(), "command": command or command_line(sys.argv[0]),
            "versions": versions("torch", "diffusers", "transformers", "accelerate", "torchmetrics"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "warmup": warmup, "seed": seed,
            "quality": None, "vram_cap_gib": vram_cap_gib if cuda else None}
    result = BenchResult(rows=rows, prompts=prompts, seeds=seeds, images=images, meta=meta)
    if quality and not shape_true:
        score_quality(result, clip=clip, reference=reference)
    return result


def score_quality(result: BenchResult, clip=None, reference=None) -> None:
    """Fill in each row's mean CLIP score (and FID and KID against `reference`, a folder or list of images)."""
    from accelerate.utils.memory import clear_device_cache

    from .. import images as imaging
    from .. import quality

    clip = clip or quality.load_clip()
    model, _ = clip
    result.meta["quality"] = ("tiny random CLIP (scores are noise)" if smoke.is_tiny() and model.config.projection_dim
                              == 16 else getattr(model.config, "_name_or_path", "") or "CLIP")
    if reference is not None and not isinstance(reference, (list, tuple)):
        reference = [imaging.open_image(p) for p in imaging.list_images(reference)]
    features = quality.ClipFeatures(*clip) if reference is not None else None
    several = len({r["setting"] for r in result.rows}) > 1
    for row in result.rows:
        name = f"{row['model']} / {row['setting']}" if several else row["model"]
        if name not in result.images:  # a model that failed
            continue
        made = result.images[name]
        scores = quality.clip_score(made, result.prompts, *clip)
        result.clip_scores[name] = [round(s, 3) for s in scores]
        row["clip_score"] = round(statistics.mean(scores), 3)
        if reference is not None and len(made) >= 2 and len(reference) >= 2:
            row["fid"] = round(quality.fid(reference, made, feature=features), 4)
            row["kid"], row["kid_std"] = (round(v, 5) for v in quality.kid(reference, made, feature=features))
    del clip, features
    clear_device_cache(garbage_collection=True)
