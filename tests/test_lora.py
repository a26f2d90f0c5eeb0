"""LoRAs on the tiny pipelines: made here with peft, saved with save_lora_weights, loaded through helpers.lora."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import diffusion, images, lora, loading, tiny


def make_lora(family: str, folder, seed: int = 0):
    """A LoRA with random (non-zero) weights for the tiny `family` UNet, in the diffusers format."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(tiny.ensure(family) / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    cls.save_lora_weights(str(folder), unet_lora_layers=layers, weight_name=f"{family}-style-{seed}.safetensors")
    return folder / f"{family}-style-{seed}.safetensors"


@pytest.fixture
def sd():
    pipe = loading.load_sd("sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_of(pipe, **kwargs):
    result = diffusion.generate(pipe, "a photo of a cat", num_inference_steps=3, width=64, height=64, seed=4,
                                progress=False, **kwargs)
    return np.asarray(result.images[0], dtype=np.int16), result


def test_scale_zero_equals_no_lora_and_scale_one_differs(sd, tmp_path):
    base, _ = image_of(sd)
    name = lora.load_lora(sd, make_lora("sd15", tmp_path), scale=0.0)
    assert name == "sd15_style_0" and lora.active_loras(sd) == {"sd15_style_0": 0.0}
    assert np.abs(image_of(sd)[0] - base).max() <= 1
    lora.set_lora_scales(sd, {name: 1.0})
    with_lora, result = image_of(sd)
    assert np.abs(with_lora - base).max() > 5
    assert 'Lora: "sd15_style_0:1"' in result.parameters[0]
    lora.unload_loras(sd)
    assert np.abs(image_of(sd)[0] - base).max() <= 1 and lora.active_loras(sd) == {}


def test_several_loras_at_once(sd, tmp_path):
    a = lora.load_lora(sd, make_lora("sd15", tmp_path, seed=1), scale=0.7)
    b = lora.load_lora(sd, make_lora("sd15", tmp_path, seed=2), scale=0.3, name="second")
    assert lora.active_loras(sd) == {a: 0.7, "second": 0.3}
    assert 'Lora: "sd15_style_1:0.7 second:0.3"' in image_of(sd)[1].parameters[0]
    with pytest.raises(ValueError, match="A LoRA named 'second' is loaded already"):
        lora.load_lora(sd, make_lora("sd15", tmp_path, seed=3), name=b)
    with pytest.raises(ValueError, match="No LoRA named nope is loaded; loaded: sd15_style_1, second"):
        lora.set_lora_scales(sd, {"nope": 1})


def test_a_lora_for_another_base_model_is_refused(tmp_path):
    pipe = loading.load_sd("sdxl")
    with pytest.raises(ValueError, match=r"is a LoRA for a model with cross-attention width 32, but this pipeline "
                                         r"\(StableDiffusionXLPipeline\) is a model with cross-attention width 64"):
        lora.load_lora(pipe, make_lora("sd15", tmp_path))


def test_real_widths_are_named():
    assert lora.CROSS_ATTENTION_FAMILIES[768] == "SD 1.x" and lora.CROSS_ATTENTION_FAMILIES[2048] == "SDXL"


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickles_are_refused_unless_allowed(tmp_path, suffix):
    path = tmp_path / f"style{suffix}"
    path.write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="is a pickle file.*allow_pickle=True"):
        lora.fetch(str(path))
    assert lora.fetch(str(path), allow_pickle=True) == path


def test_google_drive_links(monkeypatch, tmp_path):
    import gdown

    calls = []

    def fake_download(id, output, quiet):
        calls.append(id)
        target = tmp_path / "dl" / "style.safetensors"
        target.parent.mkdir(exist_ok=True)
        save_file({"x": torch.zeros(1)}, str(target))
        return str(target)

    monkeypatch.setattr(gdown, "download", fake_download)
    path = lora.fetch("https://drive.google.com/file/d/1AbCdEfGhIjKlMnOp/view?usp=sharing", folder=tmp_path / "dl")
    assert calls == ["1AbCdEfGhIjKlMnOp"] and path.name == "style.safetensors"
    from helpers import models

    with pytest.raises(models.DownloadError, match="Cannot reach https://example.org/style.safetensors"):
        lora.fetch("https://example.org/style.safetensors")   # any other link: helpers.models (offline here)


def test_missing_lora(tmp_path):
    with pytest.raises(FileNotFoundError, match="No LoRA at"):
        lora.fetch(str(tmp_path / "nothing here.safetensors"))
    with pytest.raises(FileNotFoundError, match="No LoRA at 'someone/no-such-lora'"):
        lora.fetch("someone/no-such-lora")  # offline (HF_HUB_OFFLINE=1): not on the hub either


def test_textual_inversion_embedding(sd, tmp_path):
    width = sd.text_encoder.config.hidden_size
    torch.manual_seed(0)
    save_file({"emb_params": torch.randn(1, width)}, str(tmp_path / "mystyle.safetensors"))
    token = lora.load_embedding(sd, str(tmp_path / "mystyle.safetensors"))
    assert token == "<mystyle>" and token in sd.tokenizer.get_vocab()
    result = diffusion.generate(sd, "a photo of a cat <mystyle>", num_inference_steps=2, width=64, height=64, seed=1,
                                progress=False)
    assert images.read_parameters(result.save(tmp_path / "out")[0])["prompt"] == "a photo of a cat <mystyle>"


def test_an_old_torchao_like_colabs_does_not_stop_peft_loading_a_lora(sd, tmp_path, monkeypatch):
    """Colab ships torchao 0.10.0, and peft 0.21 then refuses every LoRA (ImportError: incompatible torchao):
    measured by .ci/colab_stack. runtime.ignore_old_torchao tells peft it is absent; the LoRA loads."""
    import peft.import_utils
    import peft.tuners.lora.torchao
    import peft.utils.quantization_utils

    from helpers import lora

    path = make_lora("sd15", tmp_path)   # made before the old torchao appears (make_lora injects with peft itself)
    fake = tmp_path / "site"
    (fake / "torchao").mkdir(parents=True)
    (fake / "torchao" / "__init__.py").write_text("")
    (fake / "torchao-0.10.0.dist-info").mkdir()
    (fake / "torchao-0.10.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torchao\nVersion: 0.10.0\n")
    monkeypatch.syspath_prepend(str(fake))
    for module in (peft.import_utils, peft.tuners.lora.torchao, peft.utils.quantization_utils):
        monkeypatch.setattr(module, "is_torchao_available", module.is_torchao_available)   # restored after
    peft.import_utils.is_torchao_available.cache_clear()
    with pytest.raises(ImportError, match="incompatible version of torchao"):
        peft.import_utils.is_torchao_available()   # what peft does on Colab without the workaround
    name = lora.load_lora(sd, str(path), scale=1.0)
    assert name in sd.get_active_adapters()
    lora.unload_loras(sd)
