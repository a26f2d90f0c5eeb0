"""Image generation with the controls A1111 users expect: txt2img, img2img and inpainting through one `generate`.

`generate` checks its arguments first (errors name the argument, its value and the fix), gives image i the seed
`seed + i` (-1: a random seed, reported), picks the sampler by its A1111 name, reads A1111 prompt weighting and
prompts longer than 77 tokens (through compel), runs the diffusers pipeline, derives the img2img or inpainting
pipeline from the loaded one with `from_pipe` (no second copy of the weights), catches NaN/black fp16 output, and
returns the images with the A1111 "parameters" text of each, ready for `save`.
"""
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from . import images as imaging
from . import oom, smoke, storage

MAX_SEED = 2**32 - 1
TASK_PIPELINES = {"txt2img": "AutoPipelineForText2Image", "img2img": "AutoPipelineForImage2Image",
                  "inpaint": "AutoPipelineForInpainting"}


@dataclass
class GenerationResult:
    images: list
    seeds: list[int]
    parameters: list[str]          # the A1111 "parameters" text of each image
    settings: dict = field(default_factory=dict)

    def save(self, folder=None) -> list[Path]:
        """Save each image as a numbered PNG carrying its parameters (default folder: the project's outputs/<task>)."""
        folder = Path(folder) if folder else storage.project_paths().outputs / self.settings.get("task", "txt2img")
        return [imaging.save_image(image, folder, text, label=str(seed))
                for image, seed, text in zip(self.images, self.seeds, self.parameters)]


def family_of(pipe) -> str:
    """sd15, sdxl, sd3 or flux, from the pipeline's class."""
    name = type(pipe).__name__
    for family, marker in (("sdxl", "XL"), ("sd3", "StableDiffusion3"), ("flux", "Flux")):
        if marker in name:
            return family
    return "sd15"


def task_pipeline(pipe, task: str):
    """`pipe` itself, or the pipeline for `task` made from it with from_pipe (the same weights, no copy)."""
    import diffusers

    current = "inpaint" if "Inpaint" in type(pipe).__name__ else "img2img" if "Img2Img" in type(pipe).__name__ \
        else "txt2img"
    if current == task:
        return pipe
    derived = getattr(diffusers, TASK_PIPELINES[task]).from_pipe(pipe)
    derived.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    for attr in ("_helpers_loras", "_helpers_lora_files", "_helpers_base_scheduler_config", "_helpers_model_name",
                 "_helpers_model_file"):
        if hasattr(pipe, attr):
            setattr(derived, attr, getattr(pipe, attr))
    return derived


def _model_hash(pipe) -> dict:
    """{"Model hash": A1111's short hash (sha256[:10]) of the model's main weights file} where one is known (a
    one-file checkpoint, or a folder's UNet file; computed once, helpers.models.file_hash), else {}."""
    from . import models

    path = getattr(pipe, "_helpers_model_file", None)
    if not path or not Path(path).is_file():
        return {}
    return {"Model hash": models.file_hash(path)[:10]}


def _lora_hashes(pipe, loras: dict) -> str:
    """`name: sha256[:12]` of each loaded LoRA whose file is known, comma-separated (A1111's `Lora hashes`)."""
    from . import models

    files = getattr(pipe, "_helpers_lora_files", {})
    return ", ".join(f"{name}: {models.file_hash(files[name])[:12]}" for name in loras
                     if name in files and Path(files[name]).is_file())


def _nearest_8(value: int) -> int:
    return max(8, (value + 4) // 8 * 8)


def check_arguments(prompt, num_inference_steps, guidance_scale, width, height, num_images_per_prompt, batch_count, seed,
           strength, image, mask_image):
    from .prompts import check_prompt

    check_prompt(prompt)   # NUL or zero-width characters alone are empty too
    if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= 500:
        raise ValueError(f"`num_inference_steps` must be an integer from 1 to 500, not {num_inference_steps!r} "
                         "(20-30 is usual).")
    if not 0 <= guidance_scale <= 30:
        raise ValueError(f"`guidance_scale` (CFG scale) must be between 0 and 30, not {guidance_scale!r} "
                         "(5-9 is usual; 0-1 turns guidance off).")
    for name, value in (("width", width), ("height", height)):
        if value is not None and (not isinstance(value, int) or value < 8 or value > 4096):
            raise ValueError(f"`{name}` must be an integer from 8 to 4096 pixels, not {value!r}.")
    if width is not None and height is not None and (width % 8 or height % 8):
        raise ValueError(f"`width` and `height` have to be multiples of 8 but are {width} and {height}: use "
                         f"{_nearest_8(width)} and {_nearest_8(height)}.")
    for name, value in (("width", width), ("height", height)):
        if value is not None and value % 8:
            raise ValueError(f"`{name}` has to be a multiple of 8 but is {value}: use {_nearest_8(value)}.")
    for name, value, top in (("num_images_per_prompt", num_images_per_prompt, 16), ("batch_count", batch_count, 100)):
        if not isinstance(value, int) or not 1 <= value <= top:
            raise ValueError(f"`{name}` must be an integer from 1 to {top}, not {value!r}.")
    if not isinstance(seed, int) or not -1 <= seed <= MAX_SEED:
        raise ValueError(f"`seed` must be an integer from 0 to {MAX_SEED}, or -1 for a random one, not {seed!r}.")
    if image is not None and not 0 < strength <= 1:
        raise ValueError(f"`strength` must be in (0, 1], not {strength!r}: how much of the image is repainted "
                         "(0.3 keeps most of it, 1.0 repaints everything).")
    if mask_image is not None and image is None:
        raise ValueError("`mask_image` needs an `image` to inpaint: pass both.")


def _clip_skip_embeddings(pipe, prompt: str, negative_prompt: str, clip_skip: int) -> dict:
    """SD 1.x prompt embeddings from the CLIP layer `clip_skip` counts back from the last (A1111's Clip skip), through
    the final layer norm, as diffusers computes them. Done here because diffusers 0.42's own clip_skip path reads
    `text_encoder.text_model`, which transformers >= 5.6 no longer has (diffusers issue 14124)."""
    import torch

    encoder = pipe.text_encoder
    final_norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm

    def embed(text):
        ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids.to(encoder.device)
        with torch.no_grad():
            hidden = encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
            return final_norm(hidden)

    return {"prompt_embeds": embed(prompt), "negative_prompt_embeds": embed(negative_prompt)}


def _too_long(pipe, text: str) -> bool:
    """Whether `text` is longer than CLIP's 77 tokens (the pipeline alone would cut it off)."""
    return len(pipe.tokenizer(text).input_ids) > pipe.tokenizer.model_max_length


def _check_finite(array, nsfw, pipe, first_index: int) -> None:
    """Raise FloatingPointError, with the cause and the fix, for NaN or all-black images."""
    import numpy as np

    for i, im in enumerate(array):
        flagged = bool(nsfw[i]) if nsfw is not None and i < len(nsfw) else False
        if flagged:
            print(f"image {first_index + i}: the safety checker flagged it and blacked it out.")
        elif np.isnan(im).any() or float(np.abs(im).max()) == 0.0:
            dtype = str(getattr(pipe, "dtype", ""))
            fix = ("SDXL's stock VAE overflows in float16: load_sd('sdxl') swaps in the fp16-fix VAE "
                   "(madebyollin/sdxl-vae-fp16-fix); for another SDXL model pass that VAE, or run the VAE in "
                   "float32: pipe.vae.to(torch.float32)." if family_of(pipe) == "sdxl" else
                   "run the VAE in float32 (pipe.vae.to(torch.float32)), lower the CFG scale, or load the model "
                   "in bfloat16 where the GPU has it (Ampere or newer).")
            raise FloatingPointError(f"image {first_index + i} came out NaN or black ({dtype}). In half precision "
                                     f"this is an overflow, usually in the VAE. Fix: {fix} "
                                     "See TROUBLESHOOTING.md#nan-images")


def generate(pipe, prompt: str, negative_prompt: str = "", num_inference_steps: int = 25, guidance_scale: float = 7.0,
             width: int | None = None, height: int | None = None, num_images_per_prompt: int = 1,
             batch_count: int = 1, seed: int = -1, sampler: str | None = None, clip_skip: int = 1,
             image=None, strength: float = 0.75, mask_image=None, mask_blur: float = 4, invert_mask: bool = False,
             inpaint_area: str = "whole", padding: int = 32, keep_unmasked: bool = True, model_name: str | None = None,
             hires_scale: float = 1.0, hires_strength: float = 0.5, hires_steps: int | None = None,
             progress: bool = True) -> GenerationResult:
    """Generate `batch_count` x `num_images_per_prompt` images (seeds seed, seed+1, ...).

    txt2img without `image`; img2img with `image` (and `strength`); inpainting with `image` and `mask_image` (white
    repaints; `mask_blur` px of feathering; `inpaint_area` "whole" or "only_masked" (A1111's "only masked": the
    masked area plus `padding` px is cut out, painted at width x height, and put back); `keep_unmasked` pastes every
    unmasked pixel back exactly as it was). `clip_skip` counts as in A1111 (1: the last CLIP layer, 2: the one
    before). `hires_scale` > 1 adds A1111's hires fix: upscale, then img2img at `hires_strength`. In SMOKE MODE
    steps, size and counts are capped.
    """
    import numpy as np
    import torch

    from . import samplers

    check_arguments(prompt, num_inference_steps, guidance_scale, width, height, num_images_per_prompt, batch_count,
                    seed, strength, image, mask_image)
    if not isinstance(clip_skip, int) or not 1 <= clip_skip <= 12:
        raise ValueError(f"`clip_skip` must be an integer from 1 (no skip) to 12, not {clip_skip!r}.")
    if inpaint_area not in ("whole", "only_masked"):
        raise ValueError(f"`inpaint_area` must be 'whole' or 'only_masked', not {inpaint_area!r}.")
    if hires_scale < 1 or hires_scale > 4:
        raise ValueError(f"`hires_scale` must be from 1 (off) to 4, not {hires_scale!r}.")
    task = "inpaint" if mask_image is not None else "img2img" if image is not None else "txt2img"
    if hires_scale > 1 and task == "inpaint":
        raise ValueError("The hires fix is for txt2img and img2img; for inpainting, inpaint at the final size.")
    family = family_of(pipe)
    unet = getattr(pipe, "unet", None)
    if task != "inpaint" and unet is not None and unet.config.in_channels == 9:
        raise ValueError(f"{type(pipe).__name__} holds an inpainting model (a 9-channel UNet): it needs `image` and "
                         "`mask_image`. For txt2img or img2img load the base model, e.g. load_sd('sd15').")
    work = task_pipeline(pipe, task)
    work.set_progress_bar_config(disable=not progress)
    if sampler is not None:
        samplers.set_sampler(work, sampler)

    steps = smoke.cap("steps", num_inference_steps)
    if image is not None and int(steps * strength) < 1:
        needed = 1 / strength  # inf for a denormal strength (found by tests/test_properties.py)
        fix = (f"raise the steps to at least {int(needed) + 1} or the strength" if needed < 500
               else f"raise the strength to at least {1 / steps:g}")
        raise ValueError(f"`strength` {strength} x {steps} steps leaves no denoising step (diffusers runs "
                         f"int(steps x strength)): {fix}.")
    total = smoke.cap("images", num_images_per_prompt * batch_count)
    per_batch = min(num_images_per_prompt, total)
    if image is not None:
        image = imaging.open_image(image)
        width, height = width or image.width // 8 * 8, height or image.height // 8 * 8
    default = (getattr(work, "default_sample_size", None) or work.unet.config.sample_size) * work.vae_scale_factor
    width, height = smoke.cap_size(width or default, height or default)
    seed = secrets.randbelow(MAX_SEED + 1) if seed == -1 else seed
    seeds = [(seed + i) % (MAX_SEED + 1) for i in range(total)]

    call = {"num_inference_steps": steps, "guidance_scale": guidance_scale, "width": width, "height": height,
            **_prompt_kwargs(work, family, prompt, negative_prompt, clip_skip)}
    if task == "img2img":
        call.update(image=image.resize((width, height)), strength=strength)
        del call["width"], call["height"]
    if task == "inpaint":
        inpaint = _prepare_inpaint(image, mask_image, (width, height), mask_blur, invert_mask, inpaint_area, padding)
        call.update(image=inpaint["image"], mask_image=inpaint["mask"], strength=strength)

    images, start, ladder = [], 0, oom.Ladder(work, call, per_batch, (width, height))
    while start < total:
        batch_seeds = seeds[start:start + ladder.per_batch]
        try:
            out = work(**call, num_images_per_prompt=len(batch_seeds), output_type="np",
                       generator=[torch.Generator("cpu").manual_seed(s) for s in batch_seeds])
        except Exception as e:  # out of memory: the next rung of the ladder (helpers/oom.py); else raised as it was
            ladder.step_down(e)
            continue
        _check_finite(out.images, getattr(out, "nsfw_content_detected", None), work, start)
        images += work.numpy_to_pil(np.clip(out.images, 0, 1))
        start += len(batch_seeds)
    width, height = ladder.size  # smaller than asked where the ladder had to lower it (it said so)
    if task == "inpaint" and (keep_unmasked or inpaint_area == "only_masked"):
        from . import masks

        images = [masks.paste_back(inpaint["original"], im, inpaint["soft_mask"], inpaint["box"]) for im in images]

    settings = {"task": task, "Steps": steps, "Sampler": samplers.sampler_name(work), "CFG scale": guidance_scale,
                "Size": f"{width}x{height}", **_model_hash(pipe),
                "Model": model_name or getattr(pipe, "_helpers_model_name", "") or
                getattr(pipe.config, "_name_or_path", "")}
    if task != "txt2img":
        settings["Denoising strength"] = strength
    if task == "inpaint":
        settings.update({"Mask blur": mask_blur, "Inpaint area": "Only masked" if inpaint_area == "only_masked"
                         else "Whole picture", "Masked area padding": padding})
        settings["Size"] = f"{images[0].width}x{images[0].height}"
    if clip_skip > 1:
        settings["Clip skip"] = clip_skip
    loras = getattr(pipe, "_helpers_loras", {})
    if loras:
        settings["Lora"] = " ".join(f"{name}:{scale:g}" for name, scale in loras.items())
        hashes = _lora_hashes(pipe, loras)
        if hashes:
            settings["Lora hashes"] = hashes   # A1111 1.9's form, quoted (it holds colons): "name: sha256[:12], ..."
    if hires_scale > 1:
        images = _hires_fix(work, call, images, seeds, hires_scale, hires_strength, hires_steps or steps, progress)
        # as A1111 writes it: Size is the first pass; the upscale and its strength say the rest
        settings.update({"Denoising strength": hires_strength, "Hires upscale": hires_scale})
        if hires_steps:
            settings["Hires steps"] = hires_steps
    texts = [imaging.parameters_text(prompt, negative_prompt, **{k: v for k, v in settings.items() if k != "task"},
                                     Seed=s) for s in seeds]
    return GenerationResult(images=images, seeds=seeds, parameters=texts, settings=settings)


def _prompt_kwargs(pipe, family: str, prompt: str, negative_prompt: str, clip_skip: int) -> dict:
    """The prompt arguments of the pipeline call: embeddings from compel for weighted or long prompts (SD 1.x,
    SDXL), else the plain prompts, with clip skip."""
    from . import prompts

    if family in ("sd15", "sdxl") and any(prompts.has_weighting(p) or _too_long(pipe, p)
                                          for p in (prompt, negative_prompt)):
        return prompts.encode(pipe, prompt, negative_prompt, clip_skip=clip_skip)
    if clip_skip > 1 and family not in ("sd15", "sdxl", "sd3"):
        raise ValueError(f"`clip_skip` is for CLIP-conditioned models; {type(pipe).__name__} does not take it.")
    if clip_skip > 1 and family == "sd15":
        return _clip_skip_embeddings(pipe, prompt, negative_prompt, clip_skip)
    kwargs = {"prompt": prompt}
    if negative_prompt and family != "flux":  # FLUX is guidance-distilled: it has no negative prompt
        kwargs["negative_prompt"] = negative_prompt
    if clip_skip > 1:
        kwargs["clip_skip"] = clip_skip - 1  # diffusers counts the layers skipped: A1111's 2 is diffusers' 1
    return kwargs


def _prepare_inpaint(image, mask_image, size, mask_blur, invert_mask, inpaint_area, padding) -> dict:
    """The image and mask the pipeline gets, and what paste_back needs: the original, the feathered mask, the box."""
    from . import masks

    if mask_blur < 0:
        raise ValueError(f"`mask_blur` must be 0 or more pixels, not {mask_blur!r}.")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"`padding` must be 0 or more pixels, not {padding!r}.")
    mask = masks.load_mask(mask_image, size=image.size)  # another size is resized, with a notice
    if invert_mask:
        mask = masks.invert(mask)
    problem = masks.check_mask(mask)
    if problem and problem.kind == "empty":
        raise ValueError(problem.message)
    if problem:
        print(problem.message)
    soft = masks.feather(mask, mask_blur)
    if inpaint_area == "only_masked":
        image_crop, mask_crop, box = masks.crop_for_inpaint(image, soft, padding, size)
        return {"image": image_crop, "mask": mask_crop, "original": image, "soft_mask": soft, "box": box}
    original = image.resize(size)
    soft = soft.resize(size)
    return {"image": original, "mask": soft, "original": original, "soft_mask": soft, "box": None}


def _hires_fix(work, call, images, seeds, scale, strength, steps, progress):
    """A1111's hires fix: each image upscaled (Lanczos) by `scale`, then repainted by img2img at `strength`."""
    import torch
    from PIL import Image

    upscaler = task_pipeline(work, "img2img")
    upscaler.set_progress_bar_config(disable=not progress)
    width, height = (int(round(v * scale / 8)) * 8 for v in (images[0].width, images[0].height))
    kwargs = {k: v for k, v in call.items() if k not in ("width", "height", "image", "strength", "mask_image",
                                                            "num_inference_steps")}
    out, ladder = [], oom.Ladder(upscaler, {"width": width, "height": height}, 1, (width, height))
    for image, seed in zip(images, seeds):
        while True:
            try:
                out += upscaler(**kwargs, image=image.resize(ladder.size, Image.LANCZOS), strength=strength,
                                num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed)).images
                break
            except Exception as e:  # out of memory: the next rung of the ladder (helpers/oom.py); else raised
                ladder.step_down(e)
    return out


def settings_from_parameters(parameters: dict) -> dict:
    """`generate` keyword arguments that remake an image, from `images.read_parameters(png)`."""
    kwargs = {"prompt": parameters["prompt"], "negative_prompt": parameters.get("negative_prompt", "")}
    conversions = {"Steps": ("num_inference_steps", int), "CFG scale": ("guidance_scale", float),
                   "Seed": ("seed", int), "Sampler": ("sampler", str), "Clip skip": ("clip_skip", int),
                   "Denoising strength": ("hires_strength" if "Hires upscale" in parameters else "strength", float),
                   "Hires upscale": ("hires_scale", float), "Hires steps": ("hires_steps", int)}
    for key, (name, convert) in conversions.items():
        if key in parameters:
            kwargs[name] = convert(parameters[key])
    if "Size" in parameters:
        kwargs["width"], kwargs["height"] = (int(v) for v in parameters["Size"].split("x"))
    return kwargs
