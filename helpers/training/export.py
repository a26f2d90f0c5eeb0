"""Export a trained LoRA: the diffusers format (what `pipe.load_lora_weights` reads) and the kohya/A1111 format (one
`.safetensors` file that AUTOMATIC1111, ComfyUI, Forge and kohya's tools load, with the `ss_*`/`modelspec.*`
metadata they show).

The state dicts are what peft's `get_peft_model_state_dict` gives (keys `...to_q.lora_A.weight`); the diffusers form
(`...to_q.lora.down.weight`) and a `unet.`/`text_encoder.` or peft `base_model.model.` prefix are accepted too.
Every file is written to a hidden staging folder beside its target and renamed over it in one step, so a crash
mid-save leaves the previous file whole.
"""
import collections
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from .. import storage

FAMILIES = {
    # family: (pipeline class, ss_base_model_version, modelspec.architecture, default resolution)
    "sd15": ("StableDiffusionPipeline", "sd_v1", "stable-diffusion-v1/lora", 512),
    "sdxl": ("StableDiffusionXLPipeline", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", 1024),
}
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_KEY = re.compile(r"^lora_(unet|te|te1|te2)_\w+\.(lora_down\.weight|lora_up\.weight|alpha)$")
# Why a DoRA has no kohya/A1111 file here (checked 2026-11): the kohya-side key is `<module>.dora_scale` (LyCORIS), but
# no reader computes peft's DoRA, W' = m * (W + dW) / ||W + dW|| per output row: A1111 and LyCORIS' default normalise
# over the input axis; ComfyUI, given an (out, 1) scale, divides by the norm of the base weight W alone; and diffusers
# 0.42.1's load_lora_weights drops `dora_scale` keys ("not compatible in Diffusers at the moment"). A file would load
# everywhere and paint something other than what was trained, so it is refused.
DORA_KOHYA = ("A DoRA LoRA (use_dora=True) cannot be exported in the kohya/A1111 format faithfully: A1111, ComfyUI "
              "and diffusers each read its `dora_scale` differently from how it was trained. Use the diffusers file "
              "(pipe.load_lora_weights), or train with use_dora=False for an A1111/ComfyUI file.")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_DIFFUSERS_FORM = re.compile(r"\.(?:lora|lora_linear_layer)\.(down|up)\.")
_MAGNITUDE = ".lora_magnitude_vector"   # DoRA's learned magnitude per output feature (peft), shape (out_features,)


def _family(family: str):
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}.")
    return FAMILIES[family]


def _strip(key: str, prefixes) -> str:
    while key.startswith(prefixes):
        key = key.removeprefix(next(p for p in prefixes if key.startswith(p)))
    return key


def _peft_state_dict(state_dict, component: str) -> dict:
    """`state_dict` in peft's form (`<module>.lora_A.weight`), without any component or peft wrapper prefix; text
    encoder keys begin with `text_model.` (transformers 5 flattens CLIPTextModel; the file formats keep the name)."""
    state_dict = {_strip(k, (f"{component}.", "base_model.model.")): v for k, v in state_dict.items()}
    state_dict = {k.removesuffix(".weight") if k.endswith(f"{_MAGNITUDE}.weight") else k: v  # as save_lora_diffusers
                  for k, v in state_dict.items()}                                        # writes text encoders'

    # the diffusers form (convert_state_dict_to_diffusers): UNet `.lora.down.`, CLIP `.lora_linear_layer.down.`
    state_dict = {_DIFFUSERS_FORM.sub(lambda m: ".lora_A." if m[1] == "down" else ".lora_B.", k): v
                  for k, v in state_dict.items()}
    not_lora = [k for k in state_dict if ".lora_A." not in k and ".lora_B." not in k and not k.endswith(_MAGNITUDE)]
    if not_lora:
        raise ValueError(f"Not a LoRA state dict ({component}): keys such as {not_lora[0]!r} are neither lora_A nor "
                         "lora_B. Pass what peft's get_peft_model_state_dict(model) returns.")
    if component in _TEXT_ENCODERS:
        state_dict = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()}
    return state_dict


def _ranks(peft_sd: dict) -> dict[str, int]:
    """module name -> LoRA rank."""
    return {k.split(".lora_A.")[0]: int(v.shape[0]) for k, v in peft_sd.items() if ".lora_A." in k}


def _common_rank(ranks: dict[str, int]) -> int:
    return collections.Counter(ranks.values()).most_common(1)[0][0]


def _adapter_metadata(peft_sd: dict, alpha, component: str) -> dict:
    """The LoraConfig kwargs diffusers stores beside the weights, so that loading restores alpha (without them it
    assumes alpha == rank, i.e. a scale of 1)."""
    ranks = _ranks(peft_sd)
    if component in _TEXT_ENCODERS:   # suffix names: they match CLIPTextModel with and without its text_model level
        ranks = {k.removeprefix("text_model."): r for k, r in ranks.items()}
    r = _common_rank(ranks)
    rank_pattern = {k: v for k, v in ranks.items() if v != r}
    return {"r": r, "lora_alpha": float(alpha) if alpha is not None else r, "rank_pattern": rank_pattern,
            "alpha_pattern": dict(rank_pattern) if alpha is None else {}, "target_modules": sorted(ranks),
            "use_dora": any(k.endswith(_MAGNITUDE) for k in peft_sd), "lora_bias": False}



def _write_replacing(target: Path, write) -> Path:
    """Call `write(staging_path)` for a file in a hidden folder beside `target`, then rename it over `target` in one
    step. On any error the staging folder is removed and `target` is left as it was. A failed write (Drive gone, disk
    full) is retried, then saved to the local fallback with a notice (storage.write_with_fallback). Returns the path
    the file is at."""
    return storage.write_with_fallback(target, lambda path: _replace_once(path, write))


def _replace_once(target: Path, write) -> Path:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        staged = staging / target.name
        write(staged)
        if not staged.is_file():   # a bug, not a full disk: not retried
            raise RuntimeError(f"Saving {target.name} wrote no file.")
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staged, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    storage.fsync_dir(target.parent)
    return target


def save_lora_diffusers(folder, unet_lora_state_dict, text_encoder_lora_state_dict=None,
                        text_encoder_2_lora_state_dict=None, family: str = "sd15", *, alpha: float | None = None,
                        weight_name: str = DIFFUSERS_WEIGHT_NAME) -> Path:
    """Save a LoRA in the diffusers format (`folder/weight_name`, read by `pipe.load_lora_weights(folder)`), with
    `StableDiffusionPipeline.save_lora_weights` (or the SDXL one). `alpha`: the LoraConfig `lora_alpha` the LoRA
    was trained with (None: equal to the rank); it is stored in the file's adapter metadata. Returns the file."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers

    pipeline_name = _family(family)[0]
    if family != "sdxl" and text_encoder_2_lora_state_dict:
        raise ValueError(f"A {family} pipeline has no second text encoder: text_encoder_2_lora_state_dict is for SDXL.")
    layers, metadata = {}, {}
    for component, sd, arg in (("unet", unet_lora_state_dict, "unet"),
                               ("text_encoder", text_encoder_lora_state_dict, "text_encoder"),
                               ("text_encoder_2", text_encoder_2_lora_state_dict, "text_encoder_2")):
        peft_sd = _peft_state_dict(sd or {}, component)
        if peft_sd:
            converted = convert_state_dict_to_diffusers(peft_sd)
            if component in _TEXT_ENCODERS:
                # diffusers 0.42.1 + transformers 5.23 load a text encoder's DoRA magnitude only as
                # `...lora_magnitude_vector.weight`; the bare key is dropped as UNEXPECTED (and DoRA then runs with
                # the base norms). The UNet's loader takes the bare key.
                converted = {f"{k}.weight" if k.endswith(_MAGNITUDE) else k: v for k, v in converted.items()}
            layers[f"{arg}_lora_layers"] = converted
            metadata[f"{arg}_lora_adapter_metadata"] = _adapter_metadata(peft_sd, alpha, component)
    if not layers:
        raise ValueError("Nothing to save: every LoRA state dict is empty.")
    if not weight_name.endswith(".safetensors"):
        raise ValueError(f"weight_name must end in .safetensors, not {weight_name!r}.")
    pipeline = getattr(diffusers, pipeline_name)
    return _write_replacing(Path(folder) / weight_name, lambda staged: pipeline.save_lora_weights(
        str(staged.parent), weight_name=staged.name, safe_serialization=True, **layers, **metadata))


def kohya_state_dict(unet_lora_state_dict, text_encoder_lora_state_dict=None, text_encoder_2_lora_state_dict=None,
                     family: str = "sd15", alpha: float | None = None) -> dict:
    """The kohya/A1111 tensors (fp16): `lora_unet_<module>`, `lora_te_<module>` (SD 1.x) or `lora_te1_`/`lora_te2_`
    (SDXL), each with `.lora_down.weight`, `.lora_up.weight` and `.alpha` (= `alpha`; None: the rank).

    A DoRA (peft's `lora_magnitude_vector` keys) is refused: see DORA_KOHYA."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    _family(family)
    if family != "sdxl" and text_encoder_2_lora_state_dict:
        raise ValueError(f"A {family} pipeline has no second text encoder: text_encoder_2_lora_state_dict is for SDXL.")
    combined = {}
    for component, sd in (("unet", unet_lora_state_dict), ("text_encoder", text_encoder_lora_state_dict),
                          ("text_encoder_2", text_encoder_2_lora_state_dict)):
        combined.update({f"{component}.{k}": v for k, v in _peft_state_dict(sd or {}, component).items()})
    if not combined:
        raise ValueError("Nothing to save: every LoRA state dict is empty.")
    if any(k.endswith(_MAGNITUDE) for k in combined):
        raise ValueError(DORA_KOHYA)
    # diffusers names the text encoders lora_te1/lora_te2 and sets every alpha to the rank (a scale of 1)
    converted = convert_state_dict_to_kohya(combined)
    tensors = {}
    for key, value in converted.items():
        if family == "sd15" and key.startswith("lora_te1_"):
            key = "lora_te_" + key.removeprefix("lora_te1_")   # kohya's and A1111's name for SD 1.x's one encoder
        if key.endswith(".alpha"):
            value = torch.tensor(float(alpha) if alpha is not None else float(value))
        value = value.detach().to("cpu", torch.float16).contiguous()
        if not torch.isfinite(value).all():
            raise ValueError(f"{key} does not fit in fp16 (values beyond +-65504): the LoRA has diverged.")
        tensors[key] = value
    wrong = [k for k in tensors if not KOHYA_KEY.match(k)]
    if wrong:
        raise ValueError(f"Unexpected kohya keys: {wrong[:3]}")
    return tensors


def kohya_metadata(family: str, rank: int, alpha, steps: int | None = None, base_model: str = "",
                   output_name: str = "", trigger_word: str = "", resolution: int | None = None,
                   extra: dict | None = None) -> dict[str, str]:
    """The string metadata A1111, ComfyUI, Civitai and kohya's tools read from a LoRA file."""
    _, version, architecture, default_resolution = _family(family)
    resolution = resolution or default_resolution
    meta = {
        "ss_base_model_version": version, "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha) if alpha is not None else float(rank)).removesuffix(".0"),
        "ss_v2": "False", "ss_resolution": f"({resolution}, {resolution})",
        "ss_training_finished_at": str(time.time()),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers", "modelspec.prediction_type": "epsilon",
        "modelspec.resolution": f"{resolution}x{resolution}", "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if steps is not None:
        meta["ss_steps"] = str(int(steps))
    if base_model:
        meta["ss_sd_model_name"] = str(base_model)
    if output_name:
        meta["ss_output_name"] = meta["modelspec.title"] = str(output_name)
    if trigger_word:
        meta["modelspec.trigger_phrase"] = str(trigger_word)
        meta["ss_training_comment"] = f"trigger word: {trigger_word}"
        meta["modelspec.usage_hint"] = f"Use '{trigger_word}' in the prompt"
    for key, value in (extra or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return meta


def save_lora_kohya(path, unet_lora_state_dict, text_encoder_lora_state_dict=None,
                    text_encoder_2_lora_state_dict=None, family: str = "sd15", metadata: dict | None = None, *,
                    alpha: float | None = None, steps: int | None = None, base_model: str = "",
                    trigger_word: str = "", output_name: str | None = None, resolution: int | None = None) -> Path:
    """Save a LoRA as ONE kohya/A1111 `.safetensors` file (fp16, see `kohya_state_dict`) with the `ss_*` and
    `modelspec.*` metadata (see `kohya_metadata`; `metadata` adds or overrides fields, non-strings as JSON).
    `alpha`: the LoraConfig `lora_alpha` (None: the rank). Returns the path."""
    import safetensors.torch

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"A kohya LoRA is one .safetensors file: {str(path)!r} does not end in .safetensors.")
    tensors = kohya_state_dict(unet_lora_state_dict, text_encoder_lora_state_dict, text_encoder_2_lora_state_dict,
                               family, alpha)
    ranks = {k: int(v.shape[0]) for k, v in tensors.items() if k.endswith(".lora_down.weight")}
    meta = kohya_metadata(family, _common_rank(ranks), alpha, steps=steps, base_model=base_model,
                          output_name=path.stem if output_name is None else output_name, trigger_word=trigger_word,
                          resolution=resolution, extra=metadata)
    return _write_replacing(path, lambda staged: safetensors.torch.save_file(tensors, str(staged), metadata=meta))


def read_lora_metadata(path) -> dict[str, str]:
    """The metadata stored in a `.safetensors` file's header ({} if none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
