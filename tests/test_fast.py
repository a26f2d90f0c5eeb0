"""The fast path (helpers.fast, load_sd(fast=...)): the same image as the plain pipeline within fp rounding on the
tiny models; compile on the CPU (inductor) too; the step cache only for transformer models, and said."""
import numpy as np
import pytest
import torch

from helpers import diffusion, fast, loading


def image(pipe, **kw):
    result = diffusion.generate(pipe, "a red square on a blue background", num_inference_steps=3, width=64,
                                height=64, seed=7, progress=False, **kw)
    return np.asarray(result.images[0]).astype(int)


@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux-schnell"])
def test_the_fast_path_paints_the_plain_image(name):
    plain = loading.load_sd(name, fast=False)
    quick = loading.load_sd(name, fast=True)
    assert not hasattr(plain, "_helpers_fast") and "fused QKV" in quick._helpers_fast
    if name != "flux-schnell":
        assert quick.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(image(quick) - image(plain)).mean() < 2   # of 255


def test_compile_on_the_cpu_paints_the_plain_image():
    plain = loading.load_sd("sd15", fast=False)
    compiled = loading.load_sd("sd15", compile=True)   # compile alone turns the fast path on
    assert "compiled repeated blocks" in compiled._helpers_fast
    assert np.abs(image(compiled) - image(plain)).mean() < 2


def test_the_step_cache_is_for_transformers_and_says_what_it_costs(capsys):
    pipe = loading.load_sd("flux-schnell", step_cache=True)
    assert "step cache" in pipe._helpers_fast and "not the one the full steps paint" in capsys.readouterr().out
    assert image(pipe).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="`step_cache` is for FLUX and SD3"):
        fast.speed_up(loading.load_sd("sd15", fast=False), step_cache=True)
    with pytest.raises(ValueError, match="part of the fast path, and fast=False"):
        loading.load_sd("sd15", fast=False, compile=True)


def test_a_lora_on_the_fast_path_paints_what_it_paints_on_the_plain_one(tmp_path, capsys):
    """Fused QKV bypasses a LoRA on to_q/to_k/to_v (diffusers' fused processors call to_qkv): loading one undoes the
    fusion, so the LoRA changes the image as much as on the plain pipeline."""
    from helpers import lora
    from test_lora import make_lora

    path = make_lora("sd15", tmp_path)
    plain, quick = loading.load_sd("sd15", fast=False), loading.load_sd("sd15", fast=True)
    before = image(plain)
    lora.load_lora(plain, str(path), scale=1.0)
    lora.load_lora(quick, str(path), scale=1.0)
    assert "fused QKV projections are undone" in capsys.readouterr().out and "fused QKV" not in quick._helpers_fast
    with_lora = image(plain)
    assert np.abs(with_lora - before).mean() > 2   # the LoRA does change the image
    assert np.abs(image(quick) - with_lora).mean() < 2
