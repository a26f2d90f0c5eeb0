"""Property-based tests (hypothesis): the generation and captioning entry points, the mask helpers and open_image,
over prompts (empty, unicode, very long), sizes, seeds, masks and image modes. Each gives a result, or a ValueError /
OSError whose message names the argument or its value: never another exception."""
import io

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import captions, diffusion, images, loading, masks, smoke

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "I", "I;16", "F", "CMYK", "YCbCr", "HSV", "LAB", "RGBa", "La"]
prompts = st.one_of(st.just(""), st.text(max_size=40), st.text(alphabet="()[]:,.|\\ 0123456789abc", max_size=40),
                    st.text(min_size=200, max_size=1500))
sides = st.one_of(st.none(), st.integers(-16, 96))


def clear_error(error: Exception, **named) -> bool:
    """The message names one of the arguments (`name` in backticks, or its name) or one of the values."""
    import re

    message = str(error)
    return any(re.search(rf"\b{name}\b", message) or repr(value) in message or (str(value) and str(value) in message)
               for name, value in named.items())


def picture(mode: str, width: int, height: int, seed: int):
    """A PIL image of `mode` with varied pixel values (None where PIL cannot make that mode)."""
    import numpy as np

    try:
        base = Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))
        return base.convert(mode) if mode not in ("I;16", "PA", "La", "RGBa") else Image.new(mode, (width, height), 7)
    except (ValueError, OSError):
        return None


@pytest.fixture(scope="module")
def llava():
    return loading.load_llava("llava-1.6-mistral-7b")


# --- generation ------------------------------------------------------------------------------------------------------

@FAST
@given(prompt=prompts, negative=st.one_of(st.just(""), st.text(max_size=30)), width=sides, height=sides,
       seed=st.one_of(st.just(-1), st.integers(-3, 2**33)))
@example(prompt="a cat (((", negative="", width=64, height=64, seed=1)
@example(prompt="(a cat:1.5) [blurry] and:0.5)", negative="(ugly:", width=None, height=None, seed=0)
def test_generate(sd, prompt, negative, width, height, seed):
    try:
        result = diffusion.generate(sd, prompt, negative_prompt=negative, num_inference_steps=1, width=width,
                                    height=height, seed=seed, progress=False)
    except ValueError as e:
        assert clear_error(e, prompt=prompt, width=width, height=height, seed=seed), str(e)
        return
    (image,) = result.images
    # the tiny model's own size is 64 px; SMOKE MODE caps a larger one (keeping the aspect ratio), and says so
    assert image.size == smoke.cap_size(width or 64, height or 64)
    assert len(result.seeds) == 1 and (0 <= result.seeds[0] < 2**32 if seed == -1 else result.seeds[0] == seed)
    assert result.parameters[0].startswith(prompt)


@settings(FAST, max_examples=12)
@given(mode=st.sampled_from(MODES), w=st.integers(1, 80), h=st.integers(1, 80), mask_mode=st.sampled_from(MODES),
       mw=st.integers(1, 80), mh=st.integers(1, 80), strength=st.floats(-0.5, 1.5, allow_nan=False),
       seed=st.integers(0, 9))
@example(mode="RGB", w=64, h=64, mask_mode="L", mw=64, mh=64, strength=2.225073858507e-311, seed=0)  # 1/strength: inf
def test_inpaint(sd, mode, w, h, mask_mode, mw, mh, strength, seed):
    image, mask = picture(mode, w, h, seed), picture(mask_mode, mw, mh, seed + 1)
    assume(image is not None and mask is not None)
    try:
        result = diffusion.generate(sd, "a red car", num_inference_steps=2, image=image, mask_image=mask,
                                    strength=strength, seed=seed, progress=False)
    except (ValueError, OSError) as e:
        assert clear_error(e, image=image, mask=mask, strength=strength, width=w, height=h), str(e)
        return
    assert result.images[0].mode == "RGB"


# --- masks -----------------------------------------------------------------------------------------------------------

fractions = st.one_of(st.floats(-0.5, 1.5), st.just(float("nan")), st.just(float("inf")))


@FAST
@given(mode=st.sampled_from(MODES), w=st.integers(1, 64), h=st.integers(1, 64),
       size=st.one_of(st.none(), st.tuples(st.integers(-2, 64), st.integers(-2, 64))), seed=st.integers(0, 9))
def test_load_mask(mode, w, h, size, seed):
    source = picture(mode, w, h, seed)
    assume(source is not None)
    try:
        mask = masks.load_mask(source, size=size)
    except ValueError as e:
        assert clear_error(e, size=size), str(e)
        return
    assert mask.mode == "L" and mask.size == (size or (w, h))


@FAST
@given(w=st.integers(-2, 64), h=st.integers(-2, 64), shape=st.sampled_from(["rectangle", "ellipse", "star"]),
       x=fractions, y=fractions, width=fractions, height=fractions, radius=st.one_of(st.floats(-2, 40), fractions),
       padding=st.integers(-4, 80), target=st.one_of(st.none(), st.tuples(st.integers(-8, 96), st.integers(-8, 96))))
@example(w=16, h=16, shape="rectangle", x=0.25, y=0.25, width=0.5, height=0.5, radius=float("inf"), padding=0,
         target=None)
def test_shape_feather_crop_paste(w, h, shape, x, y, width, height, radius, padding, target):
    try:
        mask = masks.shape_mask((w, h), shape, x, y, width, height)
        soft = masks.feather(mask, radius)
        problem = masks.check_mask(soft)
        if problem and problem.kind == "empty":
            with pytest.raises(ValueError, match="all black"):
                masks.crop_region(soft, padding, target)
            return
        box = masks.crop_region(soft, padding, target)
    except ValueError as e:
        assert clear_error(e, size=(w, h), shape=shape, x=x, y=y, width=width, height=height, radius=radius,
                           padding=padding, target_size=target), str(e)
        return
    assert mask.size == soft.size == (w, h)
    left, top, right, bottom = box
    assert 0 <= left < right <= w and 0 <= top < bottom <= h
    original = Image.new("RGB", (w, h), (10, 20, 30))
    crop = Image.new("RGB", (right - left, bottom - top), (200, 0, 0))
    pasted = masks.paste_back(original, crop, soft, box)
    assert pasted.size == (w, h)
    inverted = masks.invert(soft)
    assert inverted.getpixel((0, 0)) == 255 - soft.getpixel((0, 0))


# --- open_image ------------------------------------------------------------------------------------------------------

@FAST
@given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a",
                                                             b"RIFF\x00\x00\x00\x00WEBP", b"II*\x00"]))
def test_open_image_of_random_bytes(tmp_path_factory, data, prefix):
    path = tmp_path_factory.mktemp("bytes") / "file.png"
    path.write_bytes(prefix + data)
    try:
        image = images.open_image(path)
    except ValueError as e:
        assert str(path) in str(e), str(e)
        return
    assert image.mode == "RGB"


@FAST
@given(mode=st.sampled_from(MODES), w=st.integers(1, 48), h=st.integers(1, 48),
       fmt=st.sampled_from(["PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP", None]), seed=st.integers(0, 9))
def test_open_image_of_every_mode(tmp_path_factory, mode, w, h, fmt, seed):
    source = picture(mode, w, h, seed)
    assume(source is not None)
    if fmt is not None:
        buffer = io.BytesIO()
        try:
            source.save(buffer, format=fmt)
        except (OSError, ValueError, KeyError):
            assume(False)  # PIL cannot write this mode in this format: nothing to open
        path = tmp_path_factory.mktemp("img") / f"image.{fmt.lower()}"
        path.write_bytes(buffer.getvalue())
        source = path
    try:
        image = images.open_image(source)
    except ValueError as e:
        assert min(w, h) < 8 and "too small" in str(e) and f"{w}x{h}" in str(e), str(e)
        return
    assert image.mode == "RGB" and image.size == (w, h)


# --- captioning ------------------------------------------------------------------------------------------------------

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(MODES), w=st.integers(1, 90), h=st.integers(1, 90), seed=st.integers(0, 9),
       style=st.sampled_from(["short", "detailed", "tags", "poem"]), trigger=st.one_of(st.none(), st.text(max_size=20)),
       max_chars=st.one_of(st.none(), st.integers(-5, 200)))
def test_caption_image(llava, mode, w, h, seed, style, trigger, max_chars):
    image = picture(mode, w, h, seed)
    assume(image is not None)
    try:
        caption = captions.caption_image(*llava, image, style=style, trigger=trigger, max_chars=max_chars)
    except ValueError as e:
        assert clear_error(e, style=style, max_chars=max_chars, image=f"{w}x{h}"), str(e)
        return
    assert isinstance(caption, str) and "\n" not in caption
    if trigger and trigger.strip():
        assert caption.startswith(trigger.strip())


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=400), style=st.sampled_from(list(captions.STYLES)),
       max_chars=st.one_of(st.none(), st.integers(-5, 300)))
def test_clean_caption(text, style, max_chars):
    try:
        cleaned = captions.clean_caption(text, style, max_chars)
    except ValueError as e:
        assert clear_error(e, max_chars=max_chars), str(e)
        return
    assert "\n" not in cleaned and cleaned == cleaned.strip()
    if max_chars is not None and max_chars > 0:
        assert len(cleaned) <= max_chars
