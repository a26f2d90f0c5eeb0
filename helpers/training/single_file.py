"""Export a diffusers Stable Diffusion pipeline as ONE `.safetensors` checkpoint in the original (LDM/CompVis) key
layout, the file AUTOMATIC1111, Forge and ComfyUI load from their checkpoints folder: SD 1.x, SD 2.x and SDXL.

    model.diffusion_model.*          the UNet     (input_blocks / middle_block / output_blocks)
    first_stage_model.*              the VAE      (encoder.down.N.block.M / mid.attn_1 / decoder.up.N ...)
    cond_stage_model.transformer.*   SD 1.x's CLIP text encoder (`text_model.` keys, as transformers 4 named them)
    cond_stage_model.model.*         SD 2.x's OpenCLIP-H text encoder (q/k/v joined into in_proj)
    conditioner.embedders.0.transformer.*  SDXL's CLIP-L;  conditioner.embedders.1.model.*  SDXL's OpenCLIP-G

The mapping is the one of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py and
convert_diffusers_to_original_sdxl.py (diffusers has the reverse, LDM -> diffusers, in
`diffusers.loaders.single_file_utils`, which `from_single_file` uses and the tests read the file back with). Those
scripts hard-code the real block layout (4 down blocks of 2 resnets); here the block numbers come from the UNet's and
VAE's config, so small test models convert too. A key that no rule maps is an error, never silently dropped.
"""
import json
import re
from pathlib import Path

# pipeline class -> modelspec.architecture (the img2img and inpainting pipelines hold the same parts)
PIPELINES = {"StableDiffusionPipeline": "stable-diffusion-v1", "StableDiffusionImg2ImgPipeline": "stable-diffusion-v1",
             "StableDiffusionInpaintPipeline": "stable-diffusion-v1",
             "StableDiffusionXLPipeline": "stable-diffusion-xl-v1-base",
             "StableDiffusionXLImg2ImgPipeline": "stable-diffusion-xl-v1-base",
             "StableDiffusionXLInpaintPipeline": "stable-diffusion-xl-v1-base"}

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
_VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out.")]


def _layers_per_block(config) -> int:
    n = config.layers_per_block
    if isinstance(n, (list, tuple)):
        if len(set(n)) != 1:
            raise ValueError(f"The LDM layout needs the same layers_per_block in every block, not {list(n)}.")
        n = n[0]
    return int(n)


def _convert(state_dict: dict, rules, what: str) -> dict:
    """Rename every key by the first rule whose diffusers prefix it starts with: (prefix, ldm prefix, renames of the
    rest of the key). A key no rule covers is an error."""
    out = {}
    for key, value in state_dict.items():
        for prefix, ldm_prefix, renames in rules:
            if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
                rest = key[len(prefix):]
                for old, new in renames:
                    rest = rest.replace(old, new)
                out[ldm_prefix + rest] = value
                break
        else:
            raise ValueError(f"No LDM name for the {what} weight {key!r}: this model's layout is not one the A1111 "
                             "checkpoint format has (SD 1.x, 2.x and SDXL UNets, VAEs and CLIP encoders are).")
    return out


def unet_to_ldm(state_dict: dict, config) -> dict:
    """A diffusers UNet2DConditionModel state dict -> the LDM UNet keys (without `model.diffusion_model.`)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    tables = DIFFUSERS_TO_LDM_MAPPING["unet"]
    rules = [(d, ldm, []) for d, ldm in tables["layers"].items()]
    if config.class_embed_type in ("timestep", "projection"):
        rules += [(d, ldm, []) for d, ldm in tables["class_embed_type"].items()]
    if config.addition_embed_type == "text_time":
        rules += [(d, ldm, []) for d, ldm in tables["addition_embed_type"].items()]
    n = _layers_per_block(config)
    for i in range(len(config.down_block_types)):
        for j in range(n):  # input_blocks.0 is conv_in; each down block is n layers and a downsampler
            rules.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(n + 1) * i + j + 1}.0.", _RESNET))
            rules.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(n + 1) * i + j + 1}.1.", []))
        rules.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(n + 1) * (i + 1)}.0.op.", []))
    for i in range(len(config.up_block_types)):
        for j in range(n + 1):  # each up block is n + 1 layers, its upsampler beside the last one
            rules.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(n + 1) * i + j}.0.", _RESNET))
            rules.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(n + 1) * i + j}.1.", []))
        has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state_dict)
        rules.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(n + 1) * i + n}.{2 if has_attention else 1}.",
                      []))
    rules.append(("mid_block.attentions.0.", "middle_block.1.", []))
    for j in range(2):
        rules.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", _RESNET))
    return _convert(state_dict, rules, "UNet")


def vae_to_ldm(state_dict: dict, config) -> dict:
    """A diffusers AutoencoderKL state dict -> the LDM VAE keys (without `first_stage_model.`); the mid-block attention
    projections become 1x1 convolutions, as the LDM VAE has them."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    rules = [(d, ldm, []) for d, ldm in DIFFUSERS_TO_LDM_MAPPING["vae"].items()]
    blocks = len(config.down_block_types)
    for i in range(blocks):
        rules.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", _VAE_RESNET))
        rules.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", []))
        rules.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{blocks - 1 - i}.block.", _VAE_RESNET))
        rules.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample.", []))
    for part in ("encoder", "decoder"):
        for j in range(2):
            rules.append((f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", _VAE_RESNET))
        rules.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION))
    out = _convert(state_dict, rules, "VAE")
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def _text_model_keys(state_dict: dict) -> dict:
    """CLIP keys as the checkpoint format names them: `text_model.*` (transformers 5 flattened CLIPTextModel and
    dropped that level; `from_single_file` strips it again). The position_ids buffer is not a weight."""
    return {(k if k.startswith("text_model.") or k == "text_projection.weight" else f"text_model.{k}"): v
            for k, v in state_dict.items() if not k.endswith("position_ids")}


def clip_to_ldm(state_dict: dict) -> dict:
    """A transformers CLIPTextModel state dict -> the LDM/SGM keys of a CLIP-L encoder (without its prefix)."""
    return _text_model_keys(state_dict)


def open_clip_to_ldm(state_dict: dict) -> dict:
    """A transformers CLIPTextModel(WithProjection) state dict -> OpenCLIP's keys (SDXL's second encoder, without its
    `conditioner.embedders.1.model.` prefix; SD 2.x's under `cond_stage_model.model.`): q, k and v joined into `in_proj`, the projection transposed."""
    import torch

    sd = _text_model_keys(state_dict)
    out = {}
    layers = sorted({int(m[1]) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    for n in layers:
        d, o = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[f"{o}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{d}self_attn.{p}_proj.{kind}") for p in "qkv"])
    renames = [(".self_attn.", ".attn."),
               (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."),
               (".mlp.fc2.", ".mlp.c_proj.")]
    rules = [("text_model.embeddings.position_embedding.weight", "positional_embedding", []),
             ("text_model.embeddings.token_embedding.weight", "token_embedding.weight", []),
             ("text_model.final_layer_norm.", "ln_final.", []),
             ("text_projection.weight", "text_projection", []),
             ("text_model.encoder.layers.", "transformer.resblocks.", renames)]
    out.update(_convert(sd, rules, "OpenCLIP text encoder"))
    if "text_projection" in out:  # SDXL's (a CLIPTextModelWithProjection); SD 2.x's encoder is used without one
        out["text_projection"] = out["text_projection"].T  # Linear (out, in) -> OpenCLIP's matrix (in, out)
    return out


def is_sd2(pipe) -> bool:
    """An SD 2.x pipeline: an SD pipeline whose text encoder is OpenCLIP's (gelu; OpenAI's CLIP uses quick_gelu)."""
    xl = PIPELINES.get(type(pipe).__name__, "").startswith("stable-diffusion-xl")
    return not xl and getattr(getattr(pipe.text_encoder, "config", None), "hidden_act", "") == "gelu"


def ldm_state_dict(pipe) -> dict:
    """All the pipeline's weights under their LDM names (tensors as they are: dtype and device unchanged)."""
    name = type(pipe).__name__
    if name not in PIPELINES:
        raise ValueError(f"save_single_file converts SD 1.x, 2.x and SDXL pipelines ({', '.join(PIPELINES)}), not {name}: "
                         "load an SD 1.x or SDXL model (helpers.load_sd('sd15') or 'sdxl'), or save this one as a "
                         "diffusers folder with pipe.save_pretrained(folder) instead.")
    if pipe.text_encoder is None or pipe.unet is None:
        missing = "text_encoder" if pipe.unet is not None else "unet"
        raise ValueError(f"This {name} has no {missing} (an SDXL refiner?): only SD 1.x and SDXL base models have "
                         "an A1111 single-file layout here; save it with pipe.save_pretrained(folder) instead.")
    xl = PIPELINES[name].startswith("stable-diffusion-xl")
    sd2 = is_sd2(pipe)
    parts = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict(),
             "text_encoder": pipe.text_encoder.state_dict()}
    if xl:
        parts["text_encoder_2"] = pipe.text_encoder_2.state_dict()
    for part, sd in parts.items():
        adapter = next((k for k in sd if ".lora_" in k or ".base_layer." in k), None)
        if adapter:
            raise ValueError(f"The {part} holds a LoRA adapter ({adapter!r}): merge it into the weights first with "
                             "pipe.fuse_lora(); pipe.unload_lora_weights(), or export the LoRA on its own "
                             "(helpers.training.export.save_lora_kohya).")
    out = {}
    out.update({f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(parts["unet"], pipe.unet.config).items()})
    out.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(parts["vae"], pipe.vae.config).items()})
    if sd2:  # OpenCLIP-H as SD 2.x files hold it (its 23 layers: the 24th, unused by SD 2.x, is not in diffusers)
        out.update({f"cond_stage_model.model.{k}": v for k, v in open_clip_to_ldm(parts["text_encoder"]).items()})
    elif not xl:
        out.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_to_ldm(parts["text_encoder"]).items()})
    else:
        out.update({f"conditioner.embedders.0.transformer.{k}": v
                    for k, v in clip_to_ldm(parts["text_encoder"]).items()})
        out.update({f"conditioner.embedders.1.model.{k}": v
                    for k, v in open_clip_to_ldm(parts["text_encoder_2"]).items()})
    return out


def save_single_file(pipe, path, *, half: bool = True, metadata: dict | None = None) -> Path:
    """Write `pipe` (an SD 1.x or SDXL pipeline, see PIPELINES: its UNet, VAE and text encoders) as one
    A1111/ComfyUI checkpoint `path` (`.safetensors`), in fp16 when `half` (about 2 GB for SD 1.5, 7 GB for SDXL),
    else in the weights' own dtype. `metadata`: string fields stored in the file's header (other values as JSON),
    beside `modelspec.*` fields naming the architecture. Written to a temporary file beside `path` and renamed over it,
    so a failure leaves no half-written checkpoint. Returns the path.

    Read it back with `StableDiffusionPipeline.from_single_file(path)` (or the XL one), or put it in A1111's
    models/Stable-diffusion or ComfyUI's models/checkpoints folder."""
    import safetensors.torch
    import torch

    from .export import _write_replacing

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"A single-file checkpoint is written as .safetensors: `path` {str(path)!r} does not end in "
                         f".safetensors; use {str(path.with_suffix('.safetensors'))!r}.")
    tensors, seen = {}, set()
    for key, value in ldm_state_dict(pipe).items():
        if value.device.type == "meta":
            raise ValueError(f"{key} is not in memory (device meta: sequential CPU offload or lazy loading): load the "
                             "pipeline without offloading before saving it.")
        value = value.detach()
        if value.is_floating_point() and half:
            value = value.to(torch.float16)
        value = value.to("cpu").contiguous()
        if value.data_ptr() in seen:  # safetensors refuses tensors that share memory
            value = value.clone()
        seen.add(value.data_ptr())
        tensors[key] = value
    architecture = PIPELINES[type(pipe).__name__]
    if is_sd2(pipe):
        v = getattr(getattr(pipe, "scheduler", None), "config", {}).get("prediction_type") == "v_prediction"
        architecture = "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture,
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "format": "pt", "dtype": "float16" if half else str(next(iter(tensors.values())).dtype).split(".")[-1]}
    if is_sd2(pipe):  # said, so that no reader has to guess v from epsilon (helpers.one_file.predicts_v)
        meta["modelspec.prediction_type"] = "v" if architecture.endswith("-v") else "epsilon"
    for key, value in (metadata or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return _write_replacing(path, lambda staged: safetensors.torch.save_file(tensors, str(staged), metadata=meta))
