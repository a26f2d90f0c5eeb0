"""LoRA export: the diffusers and kohya/A1111 files of a peft LoRA on the tiny UNets and CLIP text encoder load into a
fresh pipeline and paint what the trained model paints; a crash mid-save leaves the previous file whole."""
import numpy as np
import pytest
import safetensors.torch
import torch

from helpers import loading, tiny
from helpers.training import export

RANK, ALPHA = 4, 8          # alpha != rank: a file that dropped alpha would paint at half the LoRA's strength
PROMPT = "a photo of sks dog"
# fp16 keeps 11 significant bits: the kohya file's weights differ from the fp32 ones by up to ~5e-4 relative, which
# moves the tiny pipelines' [0, 1] pixels by ~1e-4 (measured); 2e-3 leaves room, while a LoRA moves them by > 1e-2.
FP16_ATOL = 2e-3
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(family: str, text_encoder: bool = False, seed: int = 0, alpha: float = ALPHA, use_dora: bool = False):
    """A LoRA with random (non-zero) weights on the tiny `family` UNet (and on its CLIP text encoder), as peft
    models: (unet, text_encoder or None), each carrying the adapter."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(tiny.ensure(family) / "unet")
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS,
                                use_dora=use_dora))
    te = None
    if text_encoder:  # transformers' own add_adapter is blocked by the peft pin (FACTS): use peft directly
        te = CLIPTextModel.from_pretrained(tiny.ensure(family) / "text_encoder")
        te = get_peft_model(te, LoraConfig(r=RANK, lora_alpha=alpha, init_lora_weights=False,
                                           target_modules=TE_TARGETS, use_dora=use_dora))
    return unet, te


def state_dicts(unet, te=None):
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unet), (get_peft_model_state_dict(te) if te is not None else None)


def paint(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=2, width=64, height=64, output_type="np",
                generator=torch.Generator().manual_seed(3)).images[0]


def paint_with(family, file=None):
    pipe = loading.load_sd(family, dtype=torch.float32)
    if file is not None:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    return paint(pipe)


@pytest.fixture(scope="module")
def sd15_lora():
    unet, te = make_lora("sd15", text_encoder=True)
    return unet, te, *state_dicts(unet, te)


def test_kohya_file_keys_dtype_alpha_and_metadata(sd15_lora, tmp_path):
    _, _, unet_sd, te_sd = sd15_lora
    path = export.save_lora_kohya(tmp_path / "sks.safetensors", unet_sd, te_sd, family="sd15", alpha=ALPHA,
                                  steps=500, base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                  trigger_word="sks", metadata={"ss_tag_frequency": {"img": {"sks": 4}}})
    tensors = safetensors.torch.load_file(str(path))
    assert {k.split("_")[1] for k in tensors} == {"unet", "te"}          # SD 1.x: lora_te_, never lora_te1_
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert all(v.dtype == torch.float16 for v in tensors.values())
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert len(tensors) == 3 * len(modules) == 3 * (len(unet_sd) + len(te_sd)) // 2
    for m in modules:
        assert tensors[f"{m}.alpha"].item() == ALPHA
        assert tensors[f"{m}.lora_down.weight"].shape[0] == RANK == tensors[f"{m}.lora_up.weight"].shape[1]
    # the weights are the peft ones, rounded to fp16
    peft_key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    torch.testing.assert_close(
        tensors["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"],
        unet_sd[peft_key].half())

    meta = export.read_lora_metadata(path)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_steps"]) == ("4", "8", "500")
    assert meta["ss_sd_model_name"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["ss_output_name"] == meta["modelspec.title"] == "sks"
    assert meta["modelspec.trigger_phrase"] == "sks" and "sks" in meta["ss_training_comment"]
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_tag_frequency"] == '{"img": {"sks": 4}}'
    assert all(isinstance(v, str) for v in meta.values())


def test_kohya_and_diffusers_files_paint_what_the_trained_model_paints(sd15_lora, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet, te, unet_sd, te_sd = sd15_lora
    diffusers_file = export.save_lora_diffusers(tmp_path / "diffusers", unet_sd, te_sd, family="sd15", alpha=ALPHA)
    kohya_file = export.save_lora_kohya(tmp_path / "kohya" / "sks.safetensors", unet_sd, te_sd, family="sd15",
                                        alpha=ALPHA)
    assert diffusers_file == tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"
    assert sorted(p.name for p in (tmp_path / "diffusers").iterdir()) == ["pytorch_lora_weights.safetensors"]

    base = loading.load_sd("sd15", dtype=torch.float32)
    trained = paint(StableDiffusionPipeline(**{**base.components, "unet": unet, "text_encoder": te.get_base_model()}))
    plain = paint_with("sd15")
    from_diffusers = paint_with("sd15", diffusers_file)
    from_kohya = paint_with("sd15", kohya_file)

    assert np.abs(trained - plain).max() > 1e-2                   # the LoRA matters
    np.testing.assert_allclose(from_diffusers, trained, atol=1e-5)  # fp32 file: alpha and every weight restored
    np.testing.assert_allclose(from_kohya, from_diffusers, atol=FP16_ATOL)
    np.testing.assert_allclose(from_kohya, trained, atol=FP16_ATOL)

    # only the text encoder's part, from the kohya file, still changes the image (its keys are read, not skipped)
    te_only = export.save_lora_kohya(tmp_path / "te-only.safetensors", {}, te_sd, family="sd15", alpha=ALPHA)
    assert np.abs(paint_with("sd15", te_only) - plain).max() > 1e-3


def test_diffusers_form_and_prefixed_keys_are_accepted(sd15_lora):
    from diffusers.utils import convert_state_dict_to_diffusers

    _, _, unet_sd, te_sd = sd15_lora
    reference = export.kohya_state_dict(unet_sd, te_sd, family="sd15", alpha=ALPHA)
    again = export.kohya_state_dict(convert_state_dict_to_diffusers(unet_sd),
                                    {f"text_encoder.{k}": v for k, v in te_sd.items()}, family="sd15", alpha=ALPHA)
    assert reference.keys() == again.keys()
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    with pytest.raises(ValueError, match="no second text encoder"):
        export.kohya_state_dict(unet_sd, None, te_sd, family="sd15")
    with pytest.raises(ValueError, match="family must be one of sd15, sdxl"):
        export.kohya_state_dict(unet_sd, family="flux")
    with pytest.raises(ValueError, match="does not end in .safetensors"):
        export.save_lora_kohya("sks.ckpt", unet_sd)


def test_sdxl_unet_lora(tmp_path):
    unet, _ = make_lora("sdxl", alpha=2)
    unet_sd, _ = state_dicts(unet)
    diffusers_file = export.save_lora_diffusers(tmp_path / "d", unet_sd, family="sdxl", alpha=2)
    kohya_file = export.save_lora_kohya(tmp_path / "k" / "xl.safetensors", unet_sd, family="sdxl", alpha=2,
                                        steps=10, base_model="stabilityai/stable-diffusion-xl-base-1.0")
    tensors = safetensors.torch.load_file(str(kohya_file))
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in tensors)
    assert all(v.dtype == torch.float16 for v in tensors.values())
    assert {v.item() for k, v in tensors.items() if k.endswith(".alpha")} == {2.0}
    meta = export.read_lora_metadata(kohya_file)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_alpha"] == "2"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    plain, from_diffusers, from_kohya = (paint_with("sdxl", f) for f in (None, diffusers_file, kohya_file))
    assert np.abs(from_diffusers - plain).max() > 1e-2
    np.testing.assert_allclose(from_kohya, from_diffusers, atol=FP16_ATOL)


def test_sdxl_text_encoder_keys_are_te1_and_te2(sd15_lora):
    _, _, unet_sd, te_sd = sd15_lora   # the key format only: any CLIP LoRA state dict will do
    tensors = export.kohya_state_dict(unet_sd, te_sd, te_sd, family="sdxl")
    prefixes = {k.split("_text_model_")[0] for k in tensors if "_text_model_" in k}
    assert prefixes == {"lora_te1", "lora_te2"}
    assert {v.item() for k, v in tensors.items() if k.endswith(".alpha")} == {RANK}   # alpha=None: the rank


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_a_crash_mid_save_leaves_the_previous_file_whole(sd15_lora, tmp_path, monkeypatch, fmt):
    unet_sd = sd15_lora[2]

    def save(folder, unet_sd):
        if fmt == "diffusers":
            return export.save_lora_diffusers(folder, unet_sd, family="sd15")
        return export.save_lora_kohya(folder / "sks.safetensors", unet_sd, family="sd15")

    path = save(tmp_path, unet_sd)
    before = path.read_bytes()

    def half_then_crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(safetensors.torch.save(tensors, metadata)[:1000])
        raise OSError("the runtime disconnected")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_crash)
    with pytest.raises(OSError, match="the runtime disconnected"):
        save(tmp_path, {k: v * 2 for k, v in unet_sd.items()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]   # no staging folder left behind
    monkeypatch.undo()
    assert save(tmp_path, {k: v * 2 for k, v in unet_sd.items()}).read_bytes() != before


def test_a_dora_round_trips_through_the_diffusers_file_and_is_refused_in_kohya_form(tmp_path):
    from diffusers import StableDiffusionPipeline

    unet, te = make_lora("sd15", text_encoder=True, use_dora=True)
    with torch.no_grad():   # magnitudes away from the base weights' norms, where DoRA starts: they must travel
        for name, param in [*unet.named_parameters(), *te.named_parameters()]:
            if "lora_magnitude_vector" in name:
                param.mul_(1.5)
    unet_sd, te_sd = state_dicts(unet, te)
    assert any(k.endswith(".lora_magnitude_vector") for k in unet_sd)
    file = export.save_lora_diffusers(tmp_path, unet_sd, te_sd, family="sd15", alpha=ALPHA)
    stored = safetensors.torch.load_file(str(file))
    assert sum("lora_magnitude_vector" in k for k in stored) == sum(
        k.endswith("lora_magnitude_vector") for k in {**unet_sd, **te_sd})   # every magnitude is in the file
    base = loading.load_sd("sd15", dtype=torch.float32)
    trained = paint(StableDiffusionPipeline(**{**base.components, "unet": unet, "text_encoder": te.get_base_model()}))
    np.testing.assert_allclose(paint_with("sd15", file), trained, atol=1e-5)   # magnitudes restored, DoRA on
    with pytest.raises(ValueError, match="A DoRA LoRA .* cannot be exported in the kohya/A1111 format"):
        export.save_lora_kohya(tmp_path / "dora.safetensors", unet_sd, te_sd, family="sd15", alpha=ALPHA)
    assert not (tmp_path / "dora.safetensors").exists()
