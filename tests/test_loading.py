import pytest
import torch

from helpers import loading, registry, runtime

T4 = runtime.Profile(platform="colab", device="cuda", gpu_name="Tesla T4", vram_gb=15.0, compute_capability=(7, 5),
                     gpu_count=1, ram_gb=12.7, torch_version="2.8.0")
A100_80 = runtime.Profile(platform="local", device="cuda", gpu_name="A100 80GB", vram_gb=79.3,
                          compute_capability=(8, 0), gpu_count=1, ram_gb=200, torch_version="2.8.0")
CPU = runtime.Profile(platform="local", device="cpu", ram_gb=24, torch_version="2.13.0")


@pytest.mark.parametrize("name, task, cls", [
    ("sd15", "txt2img", "StableDiffusionPipeline"), ("sd15", "img2img", "StableDiffusionImg2ImgPipeline"),
    ("sd15-inpaint", "inpaint", "StableDiffusionInpaintPipeline"), ("sdxl", "txt2img", "StableDiffusionXLPipeline"),
    ("sdxl-inpaint", "inpaint", "StableDiffusionXLInpaintPipeline"), ("sd3-medium", "txt2img",
                                                                      "StableDiffusion3Pipeline"),
    ("flux-schnell", "txt2img", "FluxPipeline")])
def test_load_sd_gives_the_pipeline_of_the_task(name, task, cls):
    pipe = loading.load_sd(name, task)
    assert type(pipe).__name__ == cls and pipe.dtype == torch.float32 and pipe.device.type == "cpu"


def test_load_sd_refuses_llava_and_unknown_tasks():
    with pytest.raises(ValueError, match="is a LLaVA model: load it with load_llava"):
        loading.load_sd("llava-1.6-mistral-7b")
    with pytest.raises(ValueError, match="`task` must be one of txt2img, img2img, inpaint, not 'upscale'"):
        loading.load_sd("sd15", "upscale")


def test_load_llava_full_precision_on_cpu():
    model, processor = loading.load_llava("llava-1.6-vicuna-7b")
    assert type(model).__name__ == "LlavaNextForConditionalGeneration" and model.dtype == torch.float32
    assert "USER:" in processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], add_generation_prompt=True)


def test_load_llava_4bit_path_runs_on_cpu():
    """The tiny LLaVA's hidden sizes are multiples of 64, so bitsandbytes' nf4 path runs on the CPU too."""
    from PIL import Image

    from helpers import vlm

    model, processor = loading.load_llava("llava-1.6-mistral-7b", quantization="4bit")
    assert "Linear4bit" in {type(m).__name__ for m in model.modules()}
    assert isinstance(vlm.ask(model, processor, Image.new("RGB", (32, 32)), "Hi?", max_new_tokens=2), str)


def test_load_llava_8bit_path_runs_on_cpu():
    from PIL import Image

    from helpers import vlm

    model, processor = loading.load_llava("llava-1.6-vicuna-7b", quantization="8bit")
    assert "Linear8bitLt" in {type(m).__name__ for m in model.modules()}
    assert isinstance(vlm.ask(model, processor, Image.new("RGB", (32, 32)), "Hi?", max_new_tokens=2), str)


def test_a_choice_that_cannot_fit_is_refused_before_loading(monkeypatch):
    monkeypatch.setenv("HELPERS_TINY", "0")  # offline: had it tried to load, this would be an OSError
    with pytest.raises(ValueError, match=r"llava-1.6-mistral-7b in float16 needs about 14.1 GiB.*quantization='4bit'"):
        loading.load_llava("llava-1.6-mistral-7b", quantization="none", profile=T4)


def test_load_llava_refuses_generators_and_bad_quantization():
    with pytest.raises(ValueError, match="image generator: load it with load_sd"):
        loading.load_llava("sdxl")
    with pytest.raises(ValueError, match="`quantization` must be one of auto, 4bit, 8bit, none, not 'int4'"):
        loading.load_llava(quantization="int4")


def test_auto_quantization(monkeypatch):
    monkeypatch.setenv("HELPERS_TINY", "0")
    mistral, big = registry.resolve("llava-1.6-mistral-7b"), registry.resolve("llava-1.6-34b")
    assert loading.choose_quantization(mistral, T4) == "4bit"      # 15 GB of fp16 weights: no room on a T4
    assert loading.choose_quantization(mistral, A100_80) == "none"
    assert loading.choose_quantization(big, A100_80) == "none"     # 65 GiB of fp16 weights fit in 79 GiB
    a100_40 = runtime.Profile(platform="local", device="cuda", vram_gb=39.4, compute_capability=(8, 0))
    assert loading.choose_quantization(big, a100_40) == "4bit"
    assert loading.choose_quantization(mistral, CPU) == "none"


def test_real_names_offline_fail_fast_with_what_to_do(monkeypatch):
    monkeypatch.setenv("HELPERS_TINY", "0")  # the real hub id, with HF_HUB_OFFLINE=1 (conftest)
    with pytest.raises(OSError, match="Could not load 'stable-diffusion-v1-5/stable-diffusion-v1-5'.*HELPERS_TINY=1"):
        loading.load_sd("sd15", profile=CPU)


def test_gated_models_say_how_to_set_the_token(monkeypatch):
    monkeypatch.setenv("HELPERS_TINY", "0")
    with pytest.raises(OSError, match="gated: accept its licence.*Colab secret HF_TOKEN"):
        loading.load_sd("flux-dev", profile=CPU)
