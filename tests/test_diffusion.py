"""generate() on the tiny SD 1.5 / SDXL / SD3 / FLUX pipelines."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import diffusion, images, loading, masks


def arr(image):
    return np.asarray(image, dtype=np.int16)


def gen(pipe, **kwargs):
    kwargs = {"prompt": "a photo of a cat", "num_inference_steps": 3, "width": 64, "height": 64, "seed": 1,
              "progress": False, **kwargs}
    return diffusion.generate(pipe, **kwargs)


def test_same_seed_same_image_and_other_seeds_differ(sd):
    a, b, c = gen(sd, seed=7), gen(sd, seed=7), gen(sd, seed=8)
    assert np.array_equal(arr(a.images[0]), arr(b.images[0]))
    assert not np.array_equal(arr(a.images[0]), arr(c.images[0]))
    assert a.images[0].size == (64, 64) and a.seeds == [7]


def test_batches_use_seed_plus_i_like_a1111(sd):
    result = gen(sd, seed=10, num_images_per_prompt=2, batch_count=1)
    assert result.seeds == [10, 11] and len(result.images) == 2
    single = gen(sd, seed=11)
    assert np.abs(arr(result.images[1]) - arr(single.images[0])).max() <= 1  # image 2 of the batch = seed 11 alone
    assert "Seed: 11" in result.parameters[1]


def test_random_seed_is_reported(sd):
    result = gen(sd, seed=-1)
    assert 0 <= result.seeds[0] < 2**32 and f"Seed: {result.seeds[0]}" in result.parameters[0]
    again = gen(sd, seed=result.seeds[0])
    assert np.array_equal(arr(result.images[0]), arr(again.images[0]))


def test_smoke_mode_caps_steps_and_images(sd, capsys):
    result = gen(sd, num_inference_steps=50, num_images_per_prompt=4, batch_count=2)
    out = capsys.readouterr().out
    assert "SMOKE MODE: steps 50 -> 4" in out and "SMOKE MODE: images 8 -> 2" in out
    assert len(result.images) == 2 and "Steps: 4" in result.parameters[0]


def test_parameters_round_trip_through_the_png(sd, tmp_path):
    result = gen(sd, negative_prompt="blurry, low quality", guidance_scale=5.5, seed=123, clip_skip=2,
                 sampler="Euler a")
    (path,) = result.save(tmp_path)
    params = images.read_parameters(path)
    assert params["prompt"] == "a photo of a cat" and params["negative_prompt"] == "blurry, low quality"
    assert (params["Steps"], params["Sampler"], params["CFG scale"], params["Seed"], params["Size"],
            params["Clip skip"], params["Model"]) == ("3", "Euler a", "5.5", "123", "64x64", "2", "sd15")
    remade = gen(sd, **diffusion.settings_from_parameters(params))
    assert np.array_equal(arr(remade.images[0]), arr(Image.open(path).convert("RGB")))


def test_saving_never_overwrites(sd, tmp_path):
    first = gen(sd, seed=5).save(tmp_path)
    second = gen(sd, seed=5).save(tmp_path)
    assert first != second and all(p.exists() for p in first + second)


def test_clip_skip_changes_the_image(sd):
    assert not np.array_equal(arr(gen(sd, clip_skip=1).images[0]), arr(gen(sd, clip_skip=2).images[0]))


def test_img2img_and_inpaint_share_the_weights(sd):
    img2img = diffusion.task_pipeline(sd, "img2img")
    inpaint = diffusion.task_pipeline(sd, "inpaint")
    assert type(img2img).__name__ == "StableDiffusionImg2ImgPipeline" and img2img.unet is sd.unet
    assert type(inpaint).__name__ == "StableDiffusionInpaintPipeline" and inpaint.vae is sd.vae
    start = gen(sd, seed=3).images[0]
    low, high = gen(sd, image=start, strength=0.5, num_inference_steps=4), gen(sd, image=start, strength=1.0)
    assert low.settings["task"] == "img2img" and "Denoising strength: 0.5" in low.parameters[0]
    assert np.abs(arr(low.images[0]) - arr(start)).mean() < np.abs(arr(high.images[0]) - arr(start)).mean()


def test_hires_fix_upscales_then_repaints(sd, tmp_path):
    result = gen(sd, width=48, height=64, hires_scale=1.5, hires_strength=0.4, num_inference_steps=4)
    assert result.images[0].size == (72, 96)
    params = images.read_parameters(result.save(tmp_path)[0])
    assert (params["Size"], params["Hires upscale"], params["Denoising strength"]) == ("48x64", "1.5", "0.4")
    again = gen(sd, **diffusion.settings_from_parameters(params))  # A1111's way of writing it remakes the image
    assert np.array_equal(arr(again.images[0]), arr(result.images[0]))


def test_weighted_prompts_go_through_compel(sd):
    plain, weighted = gen(sd, prompt="a photo of a cat"), gen(sd, prompt="a photo of a (cat:1.5)")
    assert not np.array_equal(arr(plain.images[0]), arr(weighted.images[0]))
    assert "a photo of a (cat:1.5)" in weighted.parameters[0]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"width": 65}, ValueError, r"`width` and `height` have to be multiples of 8 but are 65 and 64: use 64 and 64"),
    ({"num_inference_steps": 0}, ValueError, "`num_inference_steps` must be an integer from 1 to 500, not 0"),
    ({"num_inference_steps": -3}, ValueError, "`num_inference_steps` must be an integer from 1 to 500, not -3"),
    ({"guidance_scale": 45}, ValueError, r"`guidance_scale` \(CFG scale\) must be between 0 and 30, not 45"),
    ({"prompt": "  "}, ValueError, "`prompt` must be a non-empty string"),
    ({"seed": -2}, ValueError, "`seed` must be an integer from 0 to 18446744073709551615 .*, or -1"),
    ({"num_images_per_prompt": 0}, ValueError, "`num_images_per_prompt` must be an integer from 1 to 16"),
    ({"sampler": "Euler b"}, ValueError, "Euler"),
    ({"clip_skip": 0}, ValueError, "`clip_skip` must be an integer from 1"),
    ({"hires_scale": 5}, ValueError, "`hires_scale` must be from 1"),
    ({"image": Image.new("RGB", (64, 64)), "strength": 0}, ValueError, r"`strength` must be in \(0, 1\]"),
    ({"mask_image": Image.new("L", (64, 64))}, ValueError, "`mask_image` needs an `image`"),
    ({"image": Image.new("RGB", (64, 64)), "strength": 0.2}, ValueError, r"`strength` 0.2 x 3 steps leaves no denoising"),
])
def test_bad_input(sd, kwargs, error, message):
    with pytest.raises(error, match=message):
        gen(sd, **kwargs)


def test_nan_output_is_explained(monkeypatch):
    pipe = loading.load_sd("sdxl")
    original = pipe.vae.decode

    def broken(latents, *args, **kwargs):  # what an overflowing fp16 VAE gives
        (sample,) = original(latents, *args, **{**kwargs, "return_dict": False})
        return (torch.full_like(sample, float("nan")),)

    monkeypatch.setattr(pipe.vae, "decode", broken)
    with pytest.raises(FloatingPointError, match="came out NaN or black.*fp16-fix VAE"):
        gen(pipe)


@pytest.mark.parametrize("name", ["sdxl", "sd3-medium", "flux-schnell"])
def test_other_families_generate(name):
    pipe = loading.load_sd(name)
    result = gen(pipe, negative_prompt="blurry", guidance_scale=3.5)
    assert result.images[0].size == (64, 64) and np.isfinite(arr(result.images[0])).all()
    assert f"Model: {name}" in result.parameters[0]


@pytest.mark.parametrize("name", ["sd15", "sd3-medium", "flux-schnell"])
def test_img2img_keeps_the_size_of_its_image_in_every_family(name):
    """SD's img2img pipelines take the image's size; FLUX's and SD3's paint at their default (1024 px) unless given
    a width and height, which generate passes."""
    result = gen(loading.load_sd(name), image=Image.new("RGB", (64, 48), (200, 30, 30)), strength=0.6, width=None,
                 height=None)   # the size of the image
    assert result.images[0].size == (64, 48)


# --- inpainting ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo():
    return Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def square_mask():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 40, 40))
    return mask


@pytest.mark.parametrize("model", ["sd15", "sd15-inpaint"])  # the 4-channel UNet, and the 9-channel inpainting one
@pytest.mark.parametrize("area", ["whole", "only_masked"])
def test_paste_back_keeps_every_unmasked_pixel(model, area, photo, square_mask):
    pipe = loading.load_sd(model, task="inpaint")
    result = gen(pipe, image=photo, mask_image=square_mask, strength=1.0, inpaint_area=area, padding=8,
                 mask_blur=2)
    out, original = arr(result.images[0]), arr(photo)
    unmasked = np.asarray(masks.feather(square_mask, 2)) == 0  # outside the mask and its feathered edge
    assert out.shape == original.shape and unmasked.sum() > 2000
    assert np.array_equal(out[unmasked], original[unmasked])
    assert not np.array_equal(out[20:36, 20:36], original[20:36, 20:36])  # and the masked area was repainted
    assert result.settings["task"] == "inpaint" and "Mask blur: 2" in result.parameters[0]


def test_without_paste_back_the_whole_image_is_regenerated(sd, photo, square_mask):
    result = gen(sd, image=photo, mask_image=square_mask, strength=1.0, keep_unmasked=False, mask_blur=0)
    assert not np.array_equal(arr(result.images[0])[:8, :8], arr(photo)[:8, :8])


def test_masks_that_say_nothing_or_everything(sd, photo, capsys):
    with pytest.raises(ValueError, match="all black"):
        gen(sd, image=photo, mask_image=Image.new("L", (64, 64), 0))
    gen(sd, image=photo, mask_image=Image.new("L", (64, 64), 255))
    assert "whole image" in capsys.readouterr().out


def test_a_mask_of_another_size_is_resized_with_a_notice(sd, photo, capsys):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 20, 20))
    gen(sd, image=photo, mask_image=mask)
    assert "mask 32x32 resized to the image's 64x64" in capsys.readouterr().out


def test_inverted_mask_repaints_the_outside(sd, photo, square_mask):
    result = gen(sd, image=photo, mask_image=square_mask, invert_mask=True, strength=1.0, mask_blur=0)
    out, original = arr(result.images[0]), arr(photo)
    assert np.array_equal(out[20:36, 20:36], original[20:36, 20:36])
    assert not np.array_equal(out[:8, :8], original[:8, :8])
