"""The A1111 single-file checkpoint: the tiny SD 1.5 and SDXL pipelines, written in the LDM key layout and read back by
diffusers' own `from_single_file` (offline, the tiny model's folder as config), give every weight back (exactly, or
rounded to fp16) and paint the same image; bad input fails early; a failed write leaves no file behind."""
import copy
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from helpers import loading, registry
from helpers.training import single_file

LDM_KEYS = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
            "model.diffusion_model.out.2.weight", "first_stage_model.encoder.conv_in.weight",
            "first_stage_model.decoder.mid.attn_1.q.weight",
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
PARTS = ("unet", "vae", "text_encoder")
FP16_ATOL = 2e-3  # fp16 weights move the tiny pipeline's [0, 1] pixels by about 1e-4 (measured in test_training_export)


def paint(pipe):
    return pipe("a photo of a cat", num_inference_steps=2, width=64, height=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(3), output_type="np").images


def load_back(cls, path, folder):
    return cls.from_single_file(str(path), config=str(folder), local_files_only=True, dtype=torch.float32)


def rounded_to_fp16(pipe, parts):
    """The pipeline with its weights rounded to fp16 and back (what a half file holds)."""
    for part in parts:
        for p in getattr(pipe, part).parameters():
            p.data = p.data.half().float()
    return pipe


def assert_same_weights(pipe, back, parts, half: bool):
    for part in parts:
        ours, theirs = getattr(pipe, part).state_dict(), getattr(back, part).state_dict()
        assert set(ours) == set(theirs), part
        for key, value in ours.items():
            expected = value.half().float() if half and value.is_floating_point() else value
            assert torch.equal(theirs[key].float(), expected.float()), f"{part}: {key}"


@pytest.fixture(scope="module")
def sd15():
    pipe = loading.load_sd("sd15")  # SMOKE MODE: the tiny SD 1.5
    pipe.set_progress_bar_config(disable=True)
    return pipe, registry.resolve("sd15").source


def test_sd15_full_precision_reads_back_exactly(sd15, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe, folder = sd15
    path = single_file.save_single_file(pipe, tmp_path / "model.safetensors", half=False)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float32}
    assert set(LDM_KEYS) <= keys
    assert not any(k.startswith(("unet.", "vae.", "text_encoder.", "down_blocks")) for k in keys)
    back = load_back(StableDiffusionPipeline, path, folder)
    back.set_progress_bar_config(disable=True)
    assert_same_weights(pipe, back, PARTS, half=False)
    assert np.array_equal(paint(pipe), paint(back))


def test_sd15_half_is_fp16_with_metadata(sd15, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe, folder = sd15
    path = single_file.save_single_file(pipe, tmp_path / "model.safetensors",
                                        metadata={"trained_steps": 400, "trigger": "sks"})
    with safe_open(str(path), framework="pt") as f:
        meta, dtypes = f.metadata(), {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float16}
    assert meta["trained_steps"] == "400" and meta["trigger"] == "sks"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    back = load_back(StableDiffusionPipeline, path, folder)
    back.set_progress_bar_config(disable=True)
    assert_same_weights(pipe, back, PARTS, half=True)
    original = paint(pipe)
    rounded = rounded_to_fp16(copy.deepcopy(pipe), PARTS)
    assert np.array_equal(paint(rounded), paint(back))  # the same image as the weights it holds
    assert np.abs(original - paint(back)).max() < FP16_ATOL


def test_sdxl_reads_back_with_both_text_encoders(tmp_path):
    """The tiny SDXL's two text encoders have the same width, which diffusers' reader uses to tell CLIP-L from
    OpenCLIP-G (as in the real 768 and 1280): give the second one a width of its own, as the real model has."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tiny = loading.load_sd("sdxl")
    torch.manual_seed(0)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**tiny.text_encoder_2.config.to_dict(), "hidden_size": 64}))
    unet = UNet2DConditionModel.from_config(tiny.unet.config, cross_attention_dim=32 + 64)
    pipe = StableDiffusionXLPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, text_encoder_2=te2, unet=unet,
                                     tokenizer=tiny.tokenizer, tokenizer_2=tiny.tokenizer_2, scheduler=tiny.scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "diffusers")
    path = single_file.save_single_file(pipe, tmp_path / "xl.safetensors", half=False)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        projection = f.get_tensor("conditioner.embedders.1.model.text_projection")
    assert {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "conditioner.embedders.1.model.positional_embedding", "model.diffusion_model.label_emb.0.0.weight"} <= keys
    assert torch.equal(projection, te2.text_projection.weight.T)  # OpenCLIP keeps the matrix as (in, out)
    back = load_back(StableDiffusionXLPipeline, path, tmp_path / "diffusers")
    back.set_progress_bar_config(disable=True)
    assert_same_weights(pipe, back, PARTS + ("text_encoder_2",), half=False)
    assert np.array_equal(paint(pipe), paint(back))


def test_bad_input_names_the_value_and_the_fix(sd15, tmp_path):
    pipe, _ = sd15
    with pytest.raises(ValueError, match=r"model\.ckpt.*use .*model\.safetensors"):
        single_file.save_single_file(pipe, tmp_path / "model.ckpt")
    sd3 = loading.load_sd("sd3-medium")
    with pytest.raises(ValueError, match=r"not StableDiffusion3Pipeline.*save_pretrained"):
        single_file.save_single_file(sd3, tmp_path / "sd3.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_lora_must_be_fused_first(tmp_path):
    from peft import LoraConfig

    pipe = loading.load_sd("sd15")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False))
    path = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match=r"LoRA adapter.*fuse_lora"):
        single_file.save_single_file(pipe, path)
    assert not path.exists()
    pipe.fuse_lora()  # the fix the message gives: the LoRA merged into the weights, then the adapter removed
    pipe.unload_lora_weights()
    single_file.save_single_file(pipe, path, half=False)
    fused = pipe.unet.state_dict()["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    key = "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight"  # down block 1, layer 0
    saved = safetensors.torch.load_file(str(path))[key]
    assert torch.equal(saved, fused)


def test_failed_write_leaves_the_previous_file_whole(sd15, tmp_path, monkeypatch):
    pipe, _ = sd15
    path = tmp_path / "model.safetensors"
    first = single_file.save_single_file(pipe, path).read_bytes()
    real_save = safetensors.torch.save_file

    def save_then_fail(tensors, filename, metadata=None):
        real_save(dict(list(tensors.items())[:3]), filename, metadata=metadata)  # a partial file, then the crash
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        single_file.save_single_file(pipe, path, metadata={"new": "yes"})
    assert path.read_bytes() == first
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no staging file left behind


@pytest.mark.parametrize("name, model_type", [("sd15", "v1"), ("sdxl", "xl_base")])
def test_real_size_layouts_are_the_ones_diffusers_reads(name, model_type):
    """The real SD 1.5 and SDXL architectures (4 and 3 down blocks of 2 layers; built on the meta device, no memory):
    diffusers recognises the checkpoint's model type from its keys and maps every UNet, VAE and OpenCLIP key back."""
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint, infer_diffusers_model_type)

    from helpers import planner

    pipe = planner.build_shape_true(name, torch.float16, "meta")
    ldm = single_file.ldm_state_dict(pipe)
    assert infer_diffusers_model_type(ldm) == model_type
    assert set(convert_ldm_unet_checkpoint(ldm, dict(pipe.unet.config))) == set(pipe.unet.state_dict())
    assert set(convert_ldm_vae_checkpoint(ldm, dict(pipe.vae.config))) == set(pipe.vae.state_dict())
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in ldm  # the first downsampler, after 2 layers
    if name == "sdxl":
        te2 = convert_open_clip_checkpoint(pipe.text_encoder_2, ldm, prefix="conditioner.embedders.1.model.")
        assert set(te2) == {k for k in pipe.text_encoder_2.state_dict() if not k.endswith("position_ids")}
    else:
        assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in ldm
