"""The staged route (helpers.staged): text encoders load, encode and are freed before the denoiser runs; generate()
and the pipeline call work as on any pipeline, and give the one-stage route's images."""
import numpy as np
import pytest
import torch

from helpers import diffusion, loading, staged

TEXT_ENCODERS = {"flux-schnell": ("text_encoder", "text_encoder_2"),
                 "sd3-medium": ("text_encoder", "text_encoder_2", "text_encoder_3")}


def _gen(pipe, **kw):
    kw = {"prompt": "a photo of a cat", "num_inference_steps": 2, "seed": 5, "guidance_scale": 4.0,
          "progress": False, **kw}
    return [np.asarray(im, dtype=float) for im in diffusion.generate(pipe, **kw).images]


@pytest.mark.parametrize("name", ["flux-schnell", "sd3-medium"])
def test_staged_gives_the_one_stage_images_and_holds_no_text_encoder(name):
    one, two = loading.load_sd(name), loading.load_sd(name, route="staged")
    assert two._helpers_route.name == "staged" and staged.attached(two)
    assert all(getattr(two, te) is None for te in TEXT_ENCODERS[name])
    kw = {"negative_prompt": "blurry"} if name == "sd3-medium" else {}
    a, b = _gen(one, num_images_per_prompt=2, **kw), _gen(two, num_images_per_prompt=2, **kw)
    assert len(a) == len(b) == 2 and not np.array_equal(a[0], a[1])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))       # same embeddings, same seeds: the same images
    encoder = two._helpers_encoder
    assert all(getattr(two, te) is None for te in TEXT_ENCODERS[name]) and encoder._pipe is None  # freed


def test_a_batch_encodes_once_and_a_new_prompt_loads_the_encoders_again():
    pipe = loading.load_sd("flux-schnell", route="staged")
    encoder = pipe._helpers_encoder
    _gen(pipe, num_images_per_prompt=2, batch_count=2)
    assert encoder.loads == 1
    _gen(pipe, seed=9)                    # the same prompt: its embeddings are kept
    assert encoder.loads == 1
    _gen(pipe, prompt="a red car")
    assert encoder.loads == 2 and encoder._pipe is None
    encoder.keep = True                   # where RAM allows: the encoders stay loaded between prompts
    _gen(pipe, prompt="a dog")
    _gen(pipe, prompt="a castle")
    assert encoder.loads == 3 and encoder._pipe is not None


def test_the_pipeline_call_and_from_pipe_work_staged_too():
    pipe = loading.load_sd("flux-schnell", route="staged")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a cat", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    image = diffusion.generate(pipe, "a cat", num_inference_steps=4, seed=1, progress=False).images[0]
    again = _gen(pipe, image=image, strength=0.5, num_inference_steps=4)   # img2img made with from_pipe
    assert again[0].ndim == 3 and np.isfinite(again[0]).all()
    with pytest.raises(ValueError, match="encodes its prompts itself"):
        pipe(prompt_embeds=torch.zeros(1, 8, 32), pooled_prompt_embeds=torch.zeros(1, 32), num_inference_steps=1)


def test_staged_4bit_quantizes_the_t5_it_loads():
    pipe = loading.load_sd("flux-schnell", route="staged", quantization="4bit")
    assert pipe._helpers_route.quantized == ("transformer", "text_encoder_2")
    assert "Linear4bit" in {type(m).__name__ for m in pipe.transformer.modules()}
    encoder = pipe._helpers_encoder
    encoder.keep = True
    assert np.isfinite(_gen(pipe)[0]).all()
    assert "Linear4bit" in {type(m).__name__ for m in encoder._pipe.text_encoder_2.modules()}


def test_staged_is_for_flux_and_sd3():
    with pytest.raises(ValueError, match="The staged route is for flux, sd3 models; 'sd15' is sd15"):
        loading.load_sd("sd15", route="staged")
