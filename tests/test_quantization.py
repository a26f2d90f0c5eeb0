"""load_sd(..., quantization="4bit"/"8bit"): bitsandbytes through diffusers' PipelineQuantizationConfig, on the CPU
too (SMOKE MODE takes the tiny FLUX/SD3 whose quantized layers are 64 wide); SD3 without T5; FLUX's prompt rules."""
import sys

import numpy as np
import pytest
import torch

from helpers import diffusion, loading, memory, registry, runtime

T4 = runtime.Profile(platform="colab", device="cuda", gpu_name="Tesla T4", vram_gb=15.0, compute_capability=(7, 5),
                     gpu_count=1, ram_gb=12.7, torch_version="2.8.0")
T5 = {"flux-schnell": "text_encoder_2", "sd3-medium": "text_encoder_3"}


def _linears(module) -> set:
    return {type(m).__name__ for m in module.modules() if "Linear" in type(m).__name__}


def _image(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0), **kw).images
    return out


@pytest.mark.parametrize("name", ["flux-schnell", "sd3-medium"])
def test_4bit_puts_linear4bit_in_the_denoiser_and_t5_and_generates(name):
    pipe = loading.load_sd(name, quantization="4bit")
    assert "Linear4bit" in _linears(pipe.transformer) and "Linear4bit" in _linears(getattr(pipe, T5[name]))
    assert "Linear4bit" not in _linears(pipe.text_encoder)      # the small CLIP stays as it is
    assert pipe.transformer.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert pipe.transformer.config.quantization_config.bnb_4bit_use_double_quant
    assert pipe.transformer.config.quantization_config.bnb_4bit_compute_dtype == torch.float32  # the CPU's dtype
    assert pipe._helpers_route == memory.Route("cpu", "4bit", ("transformer", T5[name]))
    result = diffusion.generate(pipe, "a photo of a cat", num_inference_steps=2, seed=1, progress=False)
    assert result.images[0].size == (64, 64) and np.isfinite(np.asarray(result.images[0], float)).all()


@pytest.mark.parametrize("name", ["flux-schnell", "sd3-medium"])
def test_8bit_through_diffusers_runs_on_cpu(name):
    pipe = loading.load_sd(name, quantization="8bit")
    assert "Linear8bitLt" in _linears(pipe.transformer) and "Linear8bitLt" in _linears(getattr(pipe, T5[name]))
    assert np.isfinite(_image(pipe)).all()


def test_auto_on_cpu_quantizes_nothing():
    pipe = loading.load_sd("flux-schnell")
    assert not {"Linear4bit", "Linear8bitLt"} & _linears(pipe.transformer)
    assert pipe._helpers_route == memory.Route("cpu")


def test_4bit_stays_close_to_the_16bit_pipeline():
    """nf4 of the same weights: the image moves a little, never to noise of its own."""
    # the 4-bit load takes the 64-wide stand-in in SMOKE MODE: compare it with the same model unquantized
    full = _image(loading.load_sd(str(registry.resolve("flux-schnell", quantized=True).source)))
    quantized = _image(loading.load_sd("flux-schnell", quantization="4bit"))
    assert 0 < np.abs(full - quantized).mean() < 0.1


def test_auto_asks_the_planner_on_cuda(monkeypatch):
    asked = []

    def sd_route(model_name, precision, profile, quantization="auto"):
        asked.append((model_name, precision, quantization))
        return memory.Route("staged", "4bit", ("transformer", "text_encoder_2"), 9.0, 8.0)

    monkeypatch.setenv("HELPERS_TINY", "0")
    monkeypatch.setattr(memory, "sd_route", sd_route)
    resolved = registry.resolve("flux-schnell")
    route = loading._route(resolved, resolved, None, "auto", None, torch.float16, T4)
    assert asked == [("flux-schnell", "float16", "auto")] and route.name == "staged" and route.quantization == "4bit"
    loading._route(resolved, resolved, None, "none", None, torch.float16, T4)
    assert asked[-1][2] == "none"  # an explicit choice goes to the planner as it is


def test_the_gpu_check_is_lifted_only_while_loading_and_only_for_that_error():
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer
    from diffusers.quantizers.quantization_config import BitsAndBytesConfig

    quantizer = BnB4BitDiffusersQuantizer(BitsAndBytesConfig(load_in_4bit=True))
    with loading._bitsandbytes_without_gpu():
        quantizer.validate_environment()              # no GPU here: lifted
    with pytest.raises(RuntimeError, match="No GPU found"):
        quantizer.validate_environment()              # and back as diffusers has it


def test_bad_quantization_and_missing_bitsandbytes(monkeypatch):
    with pytest.raises(ValueError, match="`quantization` must be one of auto, 4bit, 8bit, none, not '3bit'"):
        loading.load_sd("flux-schnell", quantization="3bit")
    with pytest.raises(ValueError, match="`route` must be one of gpu, model_offload, staged"):
        loading.load_sd("flux-schnell", route="fast")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` does where it is missing
    with pytest.raises(ImportError, match=r"quantization='4bit' needs bitsandbytes.*pip install bitsandbytes"):
        loading.load_sd("flux-schnell", quantization="4bit")


def test_sd3_without_t5_says_so_and_generates(capsys):
    pipe = loading.load_sd("sd3-medium", drop_t5=True)
    assert pipe.text_encoder_3 is None and "without its T5 encoder" in capsys.readouterr().out
    assert np.isfinite(_image(pipe)).all()
    quantized = loading.load_sd("sd3-medium", drop_t5=True, quantization="4bit")
    assert quantized.text_encoder_3 is None and quantized._helpers_route.quantized == ("transformer",)
    with pytest.raises(ValueError, match="`drop_t5` is for SD3.*'flux-schnell' is flux"):
        loading.load_sd("flux-schnell", drop_t5=True)


def test_a_one_file_checkpoint_is_not_quantized(tmp_path):
    from helpers.training import single_file

    path = single_file.save_single_file(loading.load_sd("sd15"), tmp_path / "model.safetensors", half=False)
    with pytest.raises(ValueError, match="one-file checkpoint, which loads unquantized"):
        loading.load_sd(str(path), quantization="4bit")


def test_the_prequantized_repo_is_what_4bit_flux_dev_downloads(monkeypatch, capsys):
    monkeypatch.setenv("HELPERS_TINY", "0")  # offline: the load fails, after naming what it tried
    assert registry.MODELS["flux-dev"].prequantized_4bit == "diffusers/FLUX.1-dev-bnb-4bit"
    with pytest.raises(OSError, match="diffusers/FLUX.1-dev-bnb-4bit"):
        loading.load_sd("flux-dev", quantization="4bit")
    assert "pre-quantized diffusers/FLUX.1-dev-bnb-4bit" in capsys.readouterr().out


# --- FLUX and SD3 prompts ----------------------------------------------------------------------------------------

def test_flux_says_it_has_no_negative_prompt():
    dev, schnell = loading.load_sd("flux-dev"), loading.load_sd("flux-schnell")
    assert dev.transformer.config.guidance_embeds and not schnell.transformer.config.guidance_embeds
    with pytest.warns(UserWarning, match=r"FLUX.1 has no negative prompt: `negative_prompt` 'blurry' is ignored "
                                         r"\(its `guidance_scale` is the distilled guidance"):
        kwargs = diffusion._prompt_kwargs(dev, "flux", "a cat", "blurry", 1)
    assert "negative_prompt" not in kwargs
    with pytest.warns(UserWarning, match="schnell takes no guidance"):
        diffusion._prompt_kwargs(schnell, "flux", "a cat", "blurry", 1)


@pytest.mark.parametrize("name, length", [("flux-dev", 512), ("flux-schnell", 256), ("sd3-medium", 256)])
def test_max_sequence_length_comes_from_the_catalogue(name, length):
    pipe = loading.load_sd(name)
    family = diffusion.family_of(pipe)
    assert diffusion._prompt_kwargs(pipe, family, "a cat", "", 1)["max_sequence_length"] == length
    pipe._helpers_max_sequence_length = 77
    assert diffusion._prompt_kwargs(pipe, family, "a cat", "", 1)["max_sequence_length"] == 77
