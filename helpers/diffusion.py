"""Image generation with the controls A1111 users expect: txt2img, img2img and inpainting through one `generate`.

`generate` checks its arguments first (errors name the argument, its value and the fix), gives image i the seed
`seed + i` (-1: a random seed, reported), picks the sampler and schedule type by their A1111 names (default: A1111's
DPM++ 2M + Automatic), reads A1111's prompt syntax (weighting, BREAK and prompts longer than 77 tokens through compel;
`<lora:NAME:W>` tags; prompt editing and alternation, switched per step), runs the diffusers pipeline, derives the img2img or inpainting
pipeline from the loaded one with `from_pipe` (no second copy of the weights), catches NaN/black fp16 output, and
returns the images with the A1111 "parameters" text of each, ready for `save`.
"""
import inspect
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from . import images as imaging
from . import oom, smoke, storage

MAX_SEED = 2**32 - 1               # random seeds are drawn up to this, as A1111 does
MAX_TORCH_SEED = 2**64 - 1         # the largest seed a torch generator takes (image i of a batch: seed + i, unwrapped)
# A1111's hires fix upscalers this kit has: the latent ones (torch interpolate mode, antialias) and the PIL ones
LATENT_UPSCALERS = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
IMAGE_UPSCALERS = {"Lanczos": "LANCZOS", "Nearest": "NEAREST"}
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


# What each family is usually run with (its model card's defaults): the benchmark's settings and notebook 04's
RECOMMENDED = {
    "sd15": {"num_inference_steps": 25, "size": 512, "guidance_scale": 7.0},
    "sdxl": {"num_inference_steps": 25, "size": 1024, "guidance_scale": 7.0},
    "sd3": {"num_inference_steps": 28, "size": 1024, "guidance_scale": 7.0},
    "flux": {"num_inference_steps": 28, "size": 1024, "guidance_scale": 3.5},   # dev: the distilled guidance
}
RECOMMENDED_BY_MODEL = {"flux-schnell": {"num_inference_steps": 4, "guidance_scale": 0.0}}  # timestep-distilled


def recommended_settings(family: str, model: str | None = None) -> dict:
    """num_inference_steps, size and guidance_scale that `family` (or catalogue `model`) is usually run with."""
    return {**RECOMMENDED.get(family, RECOMMENDED["sd15"]), **RECOMMENDED_BY_MODEL.get(model or "", {})}


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
                 "_helpers_model_file", "_helpers_encoder", "_helpers_route", "_helpers_max_sequence_length"):
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
    if not isinstance(seed, int) or not -1 <= seed <= MAX_TORCH_SEED - num_images_per_prompt * batch_count + 1:
        raise ValueError(f"`seed` must be an integer from 0 to {MAX_TORCH_SEED - num_images_per_prompt * batch_count + 1}"
                         f" (torch's largest seed, less the images), or -1 for a random one, not {seed!r}.")
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
             batch_count: int = 1, seed: int = -1, sampler: str | None = None, schedule_type: str | None = None,
             clip_skip: int = 1,
             image=None, strength: float = 0.75, mask_image=None, mask_blur: float = 4, invert_mask: bool = False,
             inpaint_area: str = "whole", padding: int = 32, keep_unmasked: bool = True, model_name: str | None = None,
             hires_scale: float = 1.0, hires_strength: float = 0.5, hires_steps: int | None = None,
             hires_upscaler: str = "Latent", progress: bool = True) -> GenerationResult:
    """Generate `batch_count` x `num_images_per_prompt` images (seeds seed, seed+1, ...).

    txt2img without `image`; img2img with `image` (and `strength`); inpainting with `image` and `mask_image` (white
    repaints; `mask_blur` px of feathering; `inpaint_area` "whole" or "only_masked" (A1111's "only masked": the
    masked area plus `padding` px is cut out, painted at width x height, and put back); `keep_unmasked` pastes every
    unmasked pixel back exactly as it was). `sampler` and `schedule_type` are A1111's ("DPM++ 2M", "Karras"; old
    combined names such as "DPM++ 2M Karras" too; default DPM++ 2M + Automatic, for SD3/FLUX their Euler). The prompt
    takes A1111's syntax: weights, BREAK, `<lora:NAME:W>` tags (loaded from models/loras, unloaded when a later
    prompt drops them), `[from:to:when]` and `[a|b]`. `clip_skip` counts as in A1111 (1: the last CLIP layer, 2: the
    one before). `hires_scale` > 1 adds A1111's hires fix: upscale ("Latent": the latents, A1111's default;
    "Lanczos": the image), then img2img at `hires_strength`. In SMOKE MODE steps, size and counts are capped.
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
    upscaler = _hires_upscaler(hires_upscaler)
    from . import lora, prompts

    prompts.check_syntax(prompt)
    prompts.check_syntax(negative_prompt, "negative_prompt")
    text, tags = prompts.extract_loras(prompt)      # the tags never reach the text encoder
    if tags and not text.strip():
        raise ValueError(f"`prompt` {prompt!r} holds only LoRA tags: describe the image too.")
    work = task_pipeline(pipe, task)
    work.set_progress_bar_config(disable=not progress)
    if sampler is None and samplers.is_flow(work):
        sampler = samplers.FLOW_SAMPLERS[0]
    samplers.set_sampler(work, sampler, schedule_type)
    lora.apply_tags(pipe, tags)
    if work is not pipe:   # from_pipe shares the weights; the bookkeeping follows
        for attr in ("_helpers_loras", "_helpers_lora_files", "_helpers_tag_loras"):
            if hasattr(pipe, attr):
                setattr(work, attr, getattr(pipe, attr))

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
    seeds = [seed + i for i in range(total)]   # A1111: seed + i, not wrapped (torch takes up to 2**64 - 1)

    denoising_steps = int(steps * strength) if image is not None else steps
    call = {"num_inference_steps": steps, "guidance_scale": guidance_scale, "width": width, "height": height,
            **_scheduled_prompt_kwargs(work, family, text, negative_prompt, clip_skip, denoising_steps)}
    if task == "img2img":
        call.update(image=image.resize((width, height)), strength=strength)
        if "width" not in inspect.signature(type(work).__call__).parameters:  # SD's take the image's size; FLUX's,
            del call["width"], call["height"]                                 # its default (1024) unless told
    if task == "inpaint":
        inpaint = _prepare_inpaint(image, mask_image, (width, height), mask_blur, invert_mask, inpaint_area, padding)
        call.update(image=inpaint["image"], mask_image=inpaint["mask"], strength=strength)

    latent = hires_scale > 1 and upscaler in LATENT_UPSCALERS and family in ("sd15", "sdxl")
    if hires_scale > 1 and upscaler in LATENT_UPSCALERS and not latent:
        print(f"The {upscaler!r} hires upscaler is for SD 1.x and SDXL latents: {type(pipe).__name__} upscales the "
              "image with 'Lanczos'.")
        upscaler = "Lanczos"
    images, start, ladder = [], 0, oom.Ladder(work, call, per_batch, (width, height))
    while start < total:
        batch_seeds = seeds[start:start + ladder.per_batch]
        try:
            out = work(**call, num_images_per_prompt=len(batch_seeds), output_type="latent" if latent else "np",
                       generator=[torch.Generator("cpu").manual_seed(s) for s in batch_seeds])
        except Exception as e:  # out of memory: the next rung of the ladder (helpers/oom.py); else raised as it was
            ladder.step_down(e)
            continue
        if latent:   # the latent hires fix repaints these; the image comes from its pass
            images += list(out.images.split(1))
            start += len(batch_seeds)
            continue
        _check_finite(out.images, getattr(out, "nsfw_content_detected", None), work, start)
        images += work.numpy_to_pil(np.clip(out.images, 0, 1))
        start += len(batch_seeds)
    width, height = ladder.size  # smaller than asked where the ladder had to lower it (it said so)
    if task == "inpaint" and (keep_unmasked or inpaint_area == "only_masked"):
        from . import masks

        images = [masks.paste_back(inpaint["original"], im, inpaint["soft_mask"], inpaint["box"]) for im in images]

    from . import __version__

    settings = {"task": task, "Steps": steps, "Sampler": samplers.sampler_name(work),
                "Schedule type": samplers.schedule_type(work), "CFG scale": guidance_scale,
                "Size": f"{width}x{height}", **_model_hash(pipe),
                "Model": model_name or getattr(pipe, "_helpers_model_name", "") or
                getattr(pipe.config, "_name_or_path", "")}
    if task != "txt2img":
        settings["Denoising strength"] = strength
    if clip_skip > 1:
        settings["Clip skip"] = clip_skip
    if task == "inpaint":
        settings.update({"Mask blur": mask_blur, "Inpaint area": "Only masked" if inpaint_area == "only_masked"
                         else "Whole picture", "Masked area padding": padding})
        settings["Size"] = f"{images[0].width}x{images[0].height}"
    if hires_scale > 1:
        images = _hires_fix(work, call, images, seeds, hires_scale, hires_strength, hires_steps or steps, progress,
                            upscaler, (width, height), (family, text, negative_prompt, clip_skip))
        # as A1111 writes it: Size is the first pass; the upscale and its strength say the rest
        settings.update({"Denoising strength": hires_strength, "Hires upscale": hires_scale})
        if hires_steps:
            settings["Hires steps"] = hires_steps
        settings["Hires upscaler"] = upscaler
    loras = getattr(pipe, "_helpers_loras", {})
    tagged = set(getattr(pipe, "_helpers_tag_loras", {}).values())
    if set(loras) - tagged:   # not A1111's: the LoRAs load_lora loaded (a tag's name is in the prompt already)
        settings["Lora"] = " ".join(f"{name}:{scale:g}" for name, scale in loras.items() if name not in tagged)
    if loras:
        hashes = _lora_hashes(pipe, loras)
        if hashes:
            settings["Lora hashes"] = hashes   # A1111 1.9's form, quoted (it holds colons): "name: sha256[:12], ..."
    settings["Version"] = f"llava-sd-notebooks {__version__}"
    texts = [imaging.parameters_text(prompt, negative_prompt, **{k: v for k, v in settings.items() if k != "task"},
                                     Seed=s) for s in seeds]
    return GenerationResult(images=images, seeds=seeds, parameters=texts, settings=settings)


def _no_negative_prompt(pipe, negative_prompt: str) -> None:
    """Say that FLUX.1 ignores `negative_prompt` (it is guidance-distilled: there is no unconditional pass)."""
    import warnings

    dev = bool(getattr(getattr(pipe, "transformer", None), "config", {}).get("guidance_embeds", False))
    guidance = ("its `guidance_scale` is the distilled guidance (about 3.5)" if dev else
                "schnell takes no guidance either: its guidance_scale is ignored")
    warnings.warn(f"FLUX.1 has no negative prompt: `negative_prompt` {negative_prompt!r} is ignored ({guidance}); "
                  "say what you want in the prompt instead.", UserWarning, stacklevel=4)


def _prompt_kwargs(pipe, family: str, prompt: str, negative_prompt: str, clip_skip: int) -> dict:
    """The prompt arguments of the pipeline call: embeddings from compel for weighted or long prompts (SD 1.x,
    SDXL), else the plain prompts, with clip skip, and the T5 length the catalogue gives FLUX and SD3
    (`_helpers_max_sequence_length`, set by load_sd). A pipeline on the staged route (helpers.staged) encodes
    through its StagedEncoder, which a pipeline made from it with from_pipe gets here."""
    from . import prompts

    encoder = getattr(pipe, "_helpers_encoder", None)
    if encoder is not None:
        encoder.attach(pipe)   # the same call then works: the pipeline asks the encoder for the embeddings
    if family in ("sd15", "sdxl") and any(prompts.has_weighting(p) or _too_long(pipe, p)
                                          for p in (prompt, negative_prompt)):
        return prompts.encode(pipe, prompt, negative_prompt, clip_skip=clip_skip)
    if clip_skip > 1 and family not in ("sd15", "sdxl", "sd3"):
        raise ValueError(f"`clip_skip` is for CLIP-conditioned models; {type(pipe).__name__} does not take it.")
    if clip_skip > 1 and family == "sd15":
        return _clip_skip_embeddings(pipe, prompt, negative_prompt, clip_skip)
    kwargs = {"prompt": prompt}
    if negative_prompt and family == "flux":  # FLUX is guidance-distilled: it has no negative prompt
        _no_negative_prompt(pipe, negative_prompt)
    elif negative_prompt:
        kwargs["negative_prompt"] = negative_prompt
    if clip_skip > 1:
        kwargs["clip_skip"] = clip_skip - 1  # diffusers counts the layers skipped: A1111's 2 is diffusers' 1
    length = getattr(pipe, "_helpers_max_sequence_length", None)
    if length and family in ("flux", "sd3"):
        kwargs["max_sequence_length"] = length
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


def _hires_upscaler(name: str) -> str:
    """The hires upscaler's A1111 name (case forgiven); ValueError naming the ones this kit has."""
    known = {**LATENT_UPSCALERS, **IMAGE_UPSCALERS}
    found = next((k for k in known if isinstance(name, str) and k.lower() == name.strip().lower()), None)
    if found is None:
        raise ValueError(f"`hires_upscaler` must be one of {', '.join(known)}, not {name!r} (A1111's ESRGAN-type "
                         "upscalers are not part of this kit: 'Lanczos' is the nearest).")
    return found


def _scheduled_prompt_kwargs(pipe, family, prompt, negative_prompt, clip_skip, steps) -> dict:
    """The prompt arguments of the pipeline call for `steps` denoising steps: _prompt_kwargs where the prompts have
    no prompt editing or alternation; else embeddings of each step's text (prompts.encode), the first passed, the
    others swapped in by a callback_on_step_end where the text changes (SD 1.x and SDXL list `prompt_embeds` among
    their callback tensors)."""
    import torch

    from . import prompts

    positive, negative = prompts.schedule(prompt, steps), prompts.schedule(negative_prompt, steps)
    if len(positive) == 1 and len(negative) == 1:
        return _prompt_kwargs(pipe, family, positive[0][1], negative[0][1], clip_skip)
    if family not in ("sd15", "sdxl"):
        raise ValueError(f"Prompt editing [from:to:when] and alternation [a|b] are for SD 1.x and SDXL here, not "
                         f"{type(pipe).__name__}: write one prompt.")
    ends = sorted({end for end, _ in positive} | {end for end, _ in negative})

    def text_at(entries, step):
        return next(text for end, text in entries if end >= step)

    pairs = [(text_at(positive, end), text_at(negative, end)) for end in ends]
    embeds = prompts.encode(pipe, [p for p, _ in pairs], [n for _, n in pairs], clip_skip=clip_skip)
    # the callback tensor (SDXL's add_text_embeds is its pooled embedding) -> the positive and negative embeddings
    swapped = {"prompt_embeds": ("prompt_embeds", "negative_prompt_embeds")}
    if family == "sdxl":
        swapped["add_text_embeds"] = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    keys = [key for pair in swapped.values() for key in pair]

    def entry(step):   # A1111 counts steps from 1
        return next((k for k, end in enumerate(ends) if end >= step), len(ends) - 1)

    def swap(pipeline, i, t, tensors):
        if entry(i + 2) == entry(i + 1):
            return {}
        k, out = entry(i + 2), {}
        for name, (positive_key, negative_key) in swapped.items():
            current = tensors[name]
            pos, neg = embeds[positive_key][k:k + 1], embeds[negative_key][k:k + 1]
            guided = pipeline.do_classifier_free_guidance
            per = current.shape[0] // 2 if guided else current.shape[0]
            rows = [neg] * per + [pos] * per if guided else [pos] * per
            out[name] = torch.cat(rows).to(current.device, current.dtype)
        return out

    return {**{key: embeds[key][:1] for key in keys}, "callback_on_step_end": swap,
            "callback_on_step_end_tensor_inputs": list(swapped)}


def _hires_fix(work, call, images, seeds, scale, strength, steps, progress, upscaler="Lanczos", size=None,
               prompt=None):
    """A1111's hires fix: each image (or, for a latent upscaler, its latents) upscaled by `scale`, then repainted by
    img2img at `strength`; prompt editing is scheduled again over the hires steps. `size`: the first pass's size."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    upscaled = task_pipeline(work, "img2img")
    upscaled.set_progress_bar_config(disable=not progress)
    first = size or (images[0].width, images[0].height)
    width, height = (int(round(v * scale / 8)) * 8 for v in first)
    kwargs = {k: v for k, v in call.items() if k not in ("width", "height", "image", "strength", "mask_image",
                                                            "num_inference_steps")}
    if prompt is not None and "callback_on_step_end" in kwargs:
        family, text, negative, clip_skip = prompt
        for key in ("callback_on_step_end", "callback_on_step_end_tensor_inputs"):
            kwargs.pop(key)
        kwargs.update(_scheduled_prompt_kwargs(upscaled, family, text, negative, clip_skip, int(steps * strength)))
    out, ladder = [], oom.Ladder(upscaled, {"width": width, "height": height}, 1, (width, height))
    for image, seed in zip(images, seeds):
        while True:
            try:
                if upscaler in LATENT_UPSCALERS:
                    mode, antialias = LATENT_UPSCALERS[upscaler]
                    factor = upscaled.vae_scale_factor
                    start = F.interpolate(image, size=(ladder.size[1] // factor, ladder.size[0] // factor), mode=mode,
                                          antialias=antialias)
                else:
                    start = image.resize(ladder.size, getattr(Image, IMAGE_UPSCALERS[upscaler]))
                out += upscaled(**kwargs, image=start, strength=strength, num_inference_steps=steps,
                                generator=torch.Generator("cpu").manual_seed(seed)).images
                break
            except Exception as e:  # out of memory: the next rung of the ladder (helpers/oom.py); else raised
                ladder.step_down(e)
    return out


def _size(text: str, field: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"`{field}` {text!r} is not a size like 512x768.") from None
    return width, height


def settings_from_parameters(parameters: dict) -> dict:
    """`generate` keyword arguments that remake an image, from `images.read_parameters(png)` (this kit's PNGs,
    A1111's and Forge's): the sampler and schedule type as A1111 resolves them (an old "DPM++ 2M Karras" is DPM++ 2M
    + Karras; a sampler or schedule this kit lacks raises ValueError naming it and the nearest), the hires fix from
    "Hires upscale" or "Hires resize", `<lora:>` tags kept in the prompt, a size that is not a multiple of 8 rounded
    to the nearest one (with a notice). Fields not used here are ignored."""
    from . import samplers

    kwargs = {"prompt": parameters["prompt"], "negative_prompt": parameters.get("negative_prompt", "")}
    hires = "Hires upscale" in parameters or "Hires resize" in parameters
    conversions = {"Steps": ("num_inference_steps", int), "CFG scale": ("guidance_scale", float),
                   "Seed": ("seed", int), "Clip skip": ("clip_skip", int),
                   "Denoising strength": ("hires_strength" if hires else "strength", float),
                   "Hires steps": ("hires_steps", int)}
    for key, (name, convert) in conversions.items():
        if key in parameters:
            try:
                kwargs[name] = convert(parameters[key])
            except ValueError:
                raise ValueError(f"The PNG's `{key}` {parameters[key]!r} is not a number.") from None
    if kwargs.get("hires_steps") == 0:   # A1111's 0: as many as the first pass
        del kwargs["hires_steps"]
    if "Sampler" in parameters:
        kwargs["sampler"], kwargs["schedule_type"] = samplers.parse(parameters["Sampler"],
                                                                    parameters.get("Schedule type"))
    if "Size" in parameters:
        width, height = _size(parameters["Size"], "Size")
        if width % 8 or height % 8:
            print(f"The PNG's size {width}x{height} is not a multiple of 8 (diffusers needs one): remade at "
                  f"{_nearest_8(width)}x{_nearest_8(height)}.")
        kwargs["width"], kwargs["height"] = _nearest_8(width), _nearest_8(height)
    if "Hires upscale" in parameters:
        kwargs["hires_scale"] = float(parameters["Hires upscale"])
    elif "Hires resize" in parameters and "width" in kwargs:
        target_w, target_h = _size(parameters["Hires resize"], "Hires resize")
        ratios = [t / v for t, v in ((target_w, kwargs["width"]), (target_h, kwargs["height"])) if t]
        kwargs["hires_scale"] = max(ratios) if ratios else 1.0
        if len(set(round(r, 2) for r in ratios)) > 1:
            print(f"Hires resize {target_w}x{target_h} changes the aspect ratio (A1111 crops): remade at scale "
                  f"{kwargs['hires_scale']:g}.")
    if hires and "Hires upscaler" in parameters:
        name = parameters["Hires upscaler"]
        try:
            kwargs["hires_upscaler"] = _hires_upscaler(name)
        except ValueError:
            print(f"The hires upscaler {name!r} is not part of this kit: remade with 'Lanczos'.")
            kwargs["hires_upscaler"] = "Lanczos"
    elif hires:
        kwargs["hires_upscaler"] = "Latent"   # A1111's default
    return kwargs
