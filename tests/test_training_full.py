"""Full fine-tuning (DreamBooth) of the whole tiny SD 1.5 UNet: resumes exactly, exports a diffusers folder that loads
and paints differently from the base, plus one A1111 checkpoint; refused where the GPU is too small."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import loading, runtime
from helpers.training import loop
from conftest import draw_dataset

T4 = runtime.Profile(platform="colab", device="cuda", gpu_name="Tesla T4", vram_gb=14.7, compute_capability=(7, 5),
                     gpu_count=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return draw_dataset(tmp_path_factory.mktemp("data") / "3_sks dog", [(64, 64)] * 2)


def config(dataset, run_dir, **kwargs):
    settings = dict(dataset=str(dataset), run_dir=str(run_dir), resolution=64, learning_rate=1e-3, max_train_steps=4,
                    checkpoint_every=2, seed=0, method="full", instance_prompt="a photo of sks dog", trigger="sks",
                    flip_p=0.5)
    return loop.TrainConfig(**{**settings, **kwargs})


def paint(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of sks dog", num_inference_steps=2, width=64, height=64, output_type="np",
                generator=torch.Generator().manual_seed(3)).images[0]


def test_full_finetune_resumes_exactly_and_exports_a_loadable_model(dataset, tmp_path):
    from diffusers import StableDiffusionPipeline

    whole = loop.train_lora(config(dataset, tmp_path / "whole"), progress=False)
    assert whole.steps == 4 and whole.lora_path is None and whole.output == tmp_path / "whole" / "model"
    loop.train_lora(config(dataset, tmp_path / "cut"), stop_after=3, progress=False)
    resumed = loop.train_lora(config(dataset, tmp_path / "cut"), progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    weights = [load_file(r.model_dir / "unet" / "diffusion_pytorch_model.safetensors") for r in (whole, resumed)]
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 100       # the whole UNet
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    base_unet = loading.load_sd("sd15", dtype=torch.float32).unet.state_dict()
    changed = [k for k in weights[0] if not torch.equal(weights[0][k], base_unet[k])]
    assert len(changed) > len(weights[0]) // 2                                    # not only attention: all of it

    plain = paint(loading.load_sd("sd15", dtype=torch.float32))
    tuned = paint(StableDiffusionPipeline.from_pretrained(whole.model_dir))
    assert np.abs(tuned - plain).max() > 1e-3

    assert whole.single_file == tmp_path / "whole" / "sks.safetensors" and (tmp_path / "whole" / "loss.png").is_file()
    # the A1111 checkpoint (fp16) reads back through diffusers' single-file loader and paints the same
    from_single = paint(StableDiffusionPipeline.from_single_file(str(whole.single_file), config=str(whole.model_dir),
                                                                 dtype=torch.float32))
    np.testing.assert_allclose(from_single, tuned, atol=2e-3)


def test_full_finetune_is_refused_where_the_planner_says_it_does_not_fit():
    loop.check_full_fits("sd15", "sd15", T4, resolution=512)   # 8-bit AdamW: about 9 GiB (public figure: 9.92 GB)
    with pytest.raises(ValueError, match=r"full fine-tune of sdxl needs about 2\d\.\d GiB .* Tesla T4 has 14.7 GiB.*"
                                         r"method='lora'"):
        loop.check_full_fits("sdxl", "sdxl", T4, resolution=1024)
    small = runtime.Profile(platform="colab", device="cuda", gpu_name="small", vram_gb=12.0, compute_capability=(7, 5))
    loop.check_full_fits("sd15", "sd15", small)                # 8-bit AdamW fits 12 GiB ...
    with pytest.raises(ValueError, match="use optimizer='adamw8bit' or 'auto'"):
        loop.check_full_fits("sd15", "sd15", small, optimizer="adamw")   # ... plain AdamW's fp32 states do not
    with pytest.raises(ValueError, match="full fine-tune of /my/sdxl-folder needs"):
        loop.check_full_fits("/my/sdxl-folder", "sdxl", T4)   # outside the catalogue: planned as its family
    loop.check_full_fits("sdxl", "sdxl", runtime.Profile(platform="local", device="cpu"))   # CPU: slow, not refused


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "dreambooth"}, "`method` must be one of lora, full, not 'dreambooth'"),
    ({"train_text_encoder": True}, "`method='full'` trains the whole UNet only"),
    ({"use_dora": True}, "`method='full'` trains the whole UNet only"),
])
def test_bad_full_configs(dataset, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(dataset, tmp_path, **kwargs)
