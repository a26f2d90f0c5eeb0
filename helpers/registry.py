"""The model catalogue: friendly name -> hub id, revision, family, task, gated or not, licence, size.

`resolve(name)` accepts a catalogue name, a common alias of one ("SD 1.5", "sdxl-base": ALIASES), a hub id
("owner/name"; a catalogue model's own id gives that model), a local folder or a one-file `.safetensors` checkpoint.
In SMOKE MODE (helpers.smoke) every catalogue name and hub id resolves to the tiny random-weight model of its family
instead; a file the user gives is the user's own model and is never swapped (SMOKE MODE still caps steps and size).
"""
import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import one_file, smoke

FAMILIES = ("sd15", "sdxl", "sd3", "flux", "llava_next")
TASKS = ("txt2img", "img2img", "inpaint", "vlm")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    repo_id: str
    family: str                 # one of FAMILIES
    task: str                   # what the checkpoint is made for: "txt2img", "inpaint" or "vlm"
    params_b: float             # parameters in billions, all components (for plans; helpers.memory refines them)
    licence: str
    gated: bool = False         # the hub asks you to accept the licence, and a token is needed
    revision: str | None = None  # a commit to pin where the repo has changed under users; None = main
    fp16_variant: bool = False  # the repo carries *.fp16.safetensors (half the download)
    tiny: str = ""              # the tiny stand-in (helpers.tiny) used in SMOKE MODE
    note: str = ""
    prequantized_4bit: str = ""  # a hub repo of the whole pipeline already in bitsandbytes nf4 (load_sd takes it
    #                              for quantization="4bit": a smaller download, and no 16-bit copy in RAM)
    max_sequence_length: int | None = None  # T5 prompt tokens the pipeline call is given (FLUX, SD3)


def _m(*args, **kw):
    spec = ModelSpec(*args, **kw)
    return spec.name, spec


MODELS: dict[str, ModelSpec] = dict([
    # LLaVA 1.6 (LLaVA-NeXT), in the transformers format of the llava-hf organisation.
    _m("llava-1.6-mistral-7b", "llava-hf/llava-v1.6-mistral-7b-hf", "llava_next", "vlm", 7.57,
       "Apache-2.0 (Mistral-7B-Instruct base)", tiny="llava-next-mistral",
       note="[INST] chat format; the usual choice on a T4 in 4-bit"),
    _m("llava-1.6-vicuna-7b", "llava-hf/llava-v1.6-vicuna-7b-hf", "llava_next", "vlm", 7.06,
       "Llama 2 Community License (Vicuna base)", tiny="llava-next-vicuna", note="USER:/ASSISTANT: chat format"),
    _m("llava-1.6-vicuna-13b", "llava-hf/llava-v1.6-vicuna-13b-hf", "llava_next", "vlm", 13.4,
       "Llama 2 Community License (Vicuna base)", tiny="llava-next-vicuna", note="fits a T4 only in 4-bit"),
    _m("llava-1.6-34b", "llava-hf/llava-v1.6-34b-hf", "llava_next", "vlm", 34.8,
       "Apache-2.0 weights; Yi base model licence applies (see the model card)", tiny="llava-next-chatml",
       note="ChatML format; about 20 GB in 4-bit: does not fit a T4"),
    # Stable Diffusion 1.5 (the runwayml repo is gone; this is its maintained mirror).
    _m("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15", "txt2img", 1.07, "CreativeML OpenRAIL-M",
       fp16_variant=True, tiny="sd15"),
    _m("sd15-inpaint", "stable-diffusion-v1-5/stable-diffusion-inpainting", "sd15", "inpaint", 1.07,
       "CreativeML OpenRAIL-M", fp16_variant=True, tiny="sd15-inpaint", note="9-channel inpainting UNet"),
    # SDXL
    _m("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "txt2img", 3.47, "CreativeML OpenRAIL++-M",
       fp16_variant=True, tiny="sdxl", note="in fp16 needs the fp16-fix VAE (see SDXL_FP16_VAE)"),
    _m("sdxl-inpaint", "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", "sdxl", "inpaint", 3.47,
       "CreativeML OpenRAIL++-M", fp16_variant=True, tiny="sdxl-inpaint", note="9-channel inpainting UNet"),
    # SD3 and FLUX: large; for the benchmark and for GPUs with more memory than a T4 (or with offload).
    _m("sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers", "sd3", "txt2img", 7.7,
       "Stability AI Community License", gated=True, tiny="sd3", note="2B MMDiT + T5-XXL text encoder",
       max_sequence_length=256),
    _m("flux-schnell", "black-forest-labs/FLUX.1-schnell", "flux", "txt2img", 16.9, "Apache-2.0",
       tiny="flux", note="12B transformer, 1-4 steps, guidance 0; needs offload or quantisation on a T4",
       max_sequence_length=256),  # schnell was trained with 256 T5 tokens (diffusers' FLUX docs)
    _m("flux-dev", "black-forest-labs/FLUX.1-dev", "flux", "txt2img", 16.9,
       "FLUX.1 [dev] Non-Commercial License", gated=True, tiny="flux-dev",
       note="guidance-distilled (guidance_scale ~3.5 is its distilled guidance; no negative prompt), ~28-50 steps",
       prequantized_4bit="diffusers/FLUX.1-dev-bnb-4bit", max_sequence_length=512),
])

# Common names of the catalogue models, compared with case, spaces and punctuation removed (see canonical_name):
# "SD 1.5", "sd-1.5", "sd1.5" and "sd15" are one name. The catalogue names themselves match the same way.
ALIASES = {
    "sd15": ["sd1.5", "sd 1.5", "sd-v1-5", "sd v1.5", "stable diffusion 1.5", "stable-diffusion-v1-5",
             "stable diffusion v1.5", "v1-5"],
    "sd15-inpaint": ["sd 1.5 inpainting", "sd15-inpainting", "stable-diffusion-inpainting",
                     "stable diffusion 1.5 inpainting", "sd-v1-5-inpainting"],
    "sdxl": ["sdxl-base", "sdxl 1.0", "sdxl-base-1.0", "sdxl base 1.0", "stable-diffusion-xl",
             "stable diffusion xl", "stable-diffusion-xl-base-1.0", "sd xl", "xl base"],
    "sdxl-inpaint": ["sdxl-inpainting", "sdxl 1.0 inpainting", "stable-diffusion-xl-inpainting",
                     "stable-diffusion-xl-1.0-inpainting-0.1"],
    "sd3-medium": ["sd3", "sd 3 medium", "stable-diffusion-3-medium", "stable diffusion 3"],
    "flux-schnell": ["flux schnell", "flux.1 schnell", "flux.1-schnell", "flux1-schnell"],
    "flux-dev": ["flux dev", "flux.1 dev", "flux.1-dev", "flux1-dev"],
    "llava-1.6-mistral-7b": ["llava", "llava-mistral", "llava 1.6", "llava-next", "llava-v1.6-mistral-7b",
                             "llava-next-mistral-7b", "llava mistral 7b"],
    "llava-1.6-vicuna-7b": ["llava-vicuna", "llava-vicuna-7b", "llava-v1.6-vicuna-7b"],
    "llava-1.6-vicuna-13b": ["llava-13b", "llava-vicuna-13b", "llava-v1.6-vicuna-13b"],
    "llava-1.6-34b": ["llava-34b", "llava-v1.6-34b"],
}


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(text).lower())


_BY_SQUASHED = {_squash(alias): name for name, aliases in ALIASES.items() for alias in [name, *aliases]}
_BY_REPO = {spec.repo_id.lower(): name for name, spec in MODELS.items()}


def canonical_name(name) -> str | None:
    """The catalogue name that `name` means (a catalogue name, an alias in any case/spacing/punctuation, or a catalogue
    model's hub id in any case), or None."""
    text = str(name).strip()
    if text in MODELS:
        return text
    if text.lower() in _BY_REPO:
        return _BY_REPO[text.lower()]
    if "/" in text or "\\" in text:
        return None
    return _BY_SQUASHED.get(_squash(text))


# The VAE that keeps SDXL finite in fp16 (the stock SDXL VAE overflows to NaN/black images in half precision).
SDXL_FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"

# The tiny stand-in of each family, for hub ids outside the catalogue ("-inpaint" where the id says inpainting).
TINY_BY_FAMILY = {"sd15": "sd15", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "llava_next": "llava-next-mistral"}

# The tiny stand-ins whose quantized Linear layers are all a multiple of 64 wide, which bitsandbytes' CPU 4-bit kernels
# need (FACTS.md): SMOKE MODE takes them where a 4- or 8-bit load is asked for.
TINY_QUANTIZABLE = {"flux": "flux-64", "flux-dev": "flux-dev-64", "sd3": "sd3-64"}

# diffusers pipeline class (model_index.json) -> (family, task)
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": ("sd15", "txt2img"), "StableDiffusionImg2ImgPipeline": ("sd15", "txt2img"),
    "StableDiffusionInpaintPipeline": ("sd15", "inpaint"),
    "StableDiffusionXLPipeline": ("sdxl", "txt2img"), "StableDiffusionXLImg2ImgPipeline": ("sdxl", "txt2img"),
    "StableDiffusionXLInpaintPipeline": ("sdxl", "inpaint"),
    "StableDiffusion3Pipeline": ("sd3", "txt2img"), "FluxPipeline": ("flux", "txt2img"),
}


@dataclass(frozen=True)
class Resolved:
    source: str                 # what from_pretrained gets: a hub id or a local folder
    family: str | None
    task: str | None
    revision: str | None = None
    spec: ModelSpec | None = None
    tiny: bool = False          # a tiny random-weight stand-in (SMOKE MODE)
    single_file: bool = False   # `source` is a one-file .safetensors checkpoint (helpers.one_file)
    gguf: bool = False          # `source` is a GGUF transformer file (helpers.gguf), loaded into its base pipeline

    @property
    def is_local(self) -> bool:
        return Path(self.source).exists()


def family_of_folder(folder) -> tuple[str | None, str | None]:
    """(family, task) of a local model folder, read from model_index.json or config.json."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        cls = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
        return PIPELINE_FAMILIES.get(cls, (None, None))
    if (folder / "config.json").is_file():
        if json.loads((folder / "config.json").read_text()).get("model_type") == "llava_next":
            return "llava_next", "vlm"
    return None, None


def guess_family(repo_id: str) -> str | None:
    """A family guessed from a hub id's words, for SMOKE MODE stand-ins of ids outside the catalogue."""
    rid = repo_id.lower()
    for family, words in (("llava_next", ("llava",)), ("flux", ("flux",)),
                          ("sd3", ("stable-diffusion-3", "sd3")), ("sdxl", ("xl",)),
                          ("sd15", ("stable-diffusion", "sd-1", "sd1", "v1-5", "1.5"))):
        if any(w in rid for w in words):
            return family
    return None


def _check_family_task(family, task):
    if family is not None and family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; known: {', '.join(FAMILIES)}.")
    if task is not None and task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; known: {', '.join(TASKS)}.")


def _tiny(name_key: str, family: str, task: str | None, spec: ModelSpec | None = None,
          quantized: bool = False) -> Resolved:
    from . import runtime, tiny

    if quantized:
        name_key = TINY_QUANTIZABLE.get(name_key, name_key)
    runtime.silence_progress_bars()
    return Resolved(source=str(tiny.ensure(name_key)), family=family, task=task, spec=spec, tiny=True)


def resolve(name: str, task: str | None = None, family: str | None = None, quantized: bool = False) -> Resolved:
    """Turn a catalogue name, a hub id, a local folder, a one-file checkpoint or a GGUF transformer file into what
    from_pretrained needs.

    `task` ("txt2img", "img2img", "inpaint", "vlm") is what the caller will do with it; `family` names the family of a
    hub id outside the catalogue (else it is guessed from the id in SMOKE MODE, or read from the files). `quantized`:
    a 4- or 8-bit load follows, so SMOKE MODE picks the tiny stand-in bitsandbytes can quantize on a CPU
    (TINY_QUANTIZABLE).
    """
    _check_family_task(family, task)
    if not isinstance(name, (str, Path)) or not str(name).strip():
        raise ValueError(f"Model name must be a catalogue name, a hub id or a folder, not {name!r}. "
                         f"Known names: {', '.join(MODELS)}.")
    name = str(name).strip()
    path = Path(name).expanduser()
    if canonical_name(name) and not path.exists():
        name = canonical_name(name)
    if name in MODELS:
        spec = MODELS[name]
        if smoke.is_tiny():
            return _tiny(spec.tiny, spec.family, task or spec.task, spec, quantized)
        return Resolved(source=spec.repo_id, family=spec.family, task=task or spec.task, revision=spec.revision,
                        spec=spec)
    if path.suffix.lower() == ".gguf":  # a GGUF transformer: the user's own file, never swapped (helpers.gguf)
        from . import gguf

        info = gguf.inspect(path)
        return Resolved(source=info.path, family=info.family, task=task or "txt2img", gguf=True)
    if path.is_file() or path.suffix.lower() == ".safetensors" or (path.suffix.lower() in one_file.PICKLE_SUFFIXES
                                                                    and not path.is_dir()):
        # the user's own file: read its header (never its weights), never swapped for a tiny stand-in
        info = one_file.check_checkpoint(one_file.inspect(path))
        return Resolved(source=str(path.resolve()), family=family or info.family, task=task or info.task,
                        single_file=True)
    if path.is_dir():
        fam, native_task = family_of_folder(path)
        return Resolved(source=str(path.resolve()), family=family or fam, task=task or native_task)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and " " not in name:
        fam = family or guess_family(name)
        if smoke.is_tiny():
            if fam is None:
                raise ValueError(f"SMOKE MODE needs the family of {name!r} to pick its tiny stand-in: pass "
                                 f"family= one of {', '.join(FAMILIES)}.")
            key = TINY_BY_FAMILY[fam]
            if "inpaint" in name.lower() and fam in ("sd15", "sdxl"):
                key += "-inpaint"
            return _tiny(key, fam, task, quantized=quantized)
        return Resolved(source=name, family=fam, task=task)
    close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"Unknown model {name!r}.{hint} Known names: {', '.join(MODELS)}. A hub id looks like "
                     f"'owner/name'; a local folder must exist (checked {str(path.resolve())!r}).")
