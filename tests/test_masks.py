import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import masks


def _square_mask(size=(64, 64), box=(20, 20, 44, 44)):
    a = np.zeros((size[1], size[0]), np.uint8)
    a[box[1]:box[3], box[0]:box[2]] = 255
    return Image.fromarray(a)


def _random_mask(rng, size, blur):
    """A mask of a few random rectangles, feathered: black, white and grey pixels all present."""
    w, h = size
    a = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(1, 4)):
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        a[y0:y0 + rng.integers(4, h // 3), x0:x0 + rng.integers(4, w // 3)] = 255
    return masks.feather(Image.fromarray(a), blur)


def test_import_stays_light():
    code = "import sys, helpers.masks; print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- shapes -------------------------------------------------------------------------------------------------------

def test_rectangle_lands_where_the_fractions_say():
    m = masks.shape_mask((100, 80), "rectangle", x=0.1, y=0.25, width=0.5, height=0.5)
    a = np.asarray(m)
    assert m.mode == "L" and m.size == (100, 80)
    assert (a[20:60, 10:60] == 255).all()  # x 10..59, y 20..59
    outside = a.copy()
    outside[20:60, 10:60] = 0
    assert not outside.any()


def test_the_same_fractions_mark_the_same_area_at_another_resolution():
    small = masks.shape_mask((100, 80), x=0.1, y=0.25, width=0.5, height=0.5)
    large = masks.shape_mask((400, 320), x=0.1, y=0.25, width=0.5, height=0.5)
    assert np.array_equal(np.asarray(large.resize((100, 80), Image.Resampling.NEAREST)), np.asarray(small))


def test_ellipse_fills_its_box_and_not_the_corners():
    a = np.asarray(masks.shape_mask((200, 100), "ellipse", x=0.25, y=0.2, width=0.5, height=0.6))
    # box: x 50..150, y 20..80; centre (100, 50), radii 50 and 30
    assert a[50, 100] == 255 and a[50, 52] == 255 and a[50, 147] == 255 and a[22, 100] == 255 and a[77, 100] == 255
    assert a[21, 51] == 0 and a[78, 148] == 0 and a[50, 48] == 0 and a[50, 151] == 0 and a[18, 100] == 0
    assert a[:, :49].max() == 0 and a[:, 151:].max() == 0 and a[:19].max() == 0 and a[81:].max() == 0
    assert abs((a == 255).sum() / (np.pi * 50 * 30) - 1) < 0.02
    assert set(np.unique(a)) == {0, 255}  # a hard edge


def test_a_shape_past_the_edge_is_cut_there():
    a = np.asarray(masks.shape_mask((100, 100), "rectangle", x=0.8, y=0.0, width=0.5, height=0.1))
    assert (a[:10, 80:] == 255).all() and a[:10, :80].max() == 0 and a[10:].max() == 0


@pytest.mark.parametrize("kwargs, named", [
    (dict(x=-0.1), "x=-0.1"),
    (dict(y=1.5), "y=1.5"),
    (dict(width=2), "width=2"),
    (dict(height=-1, x=3), "x=3, height=-1"),
    (dict(x="0.5"), "x='0.5'"),
])
def test_invalid_fractions_raise_naming_them(kwargs, named):
    with pytest.raises(ValueError, match=rf"{named}: `x`, `y`, `width` and `height` are fractions"):
        masks.shape_mask((64, 64), **kwargs)


def test_unknown_shape_and_bad_size_raise():
    with pytest.raises(ValueError, match="`shape` must be one of .*'circle'"):
        masks.shape_mask((64, 64), "circle")
    with pytest.raises(ValueError, match=r"`size` must be \(width, height\).*\(0, 64\)"):
        masks.shape_mask((0, 64))


# --- editing ------------------------------------------------------------------------------------------------------

def test_invert_swaps_and_twice_is_identity():
    m = _random_mask(np.random.default_rng(0), (64, 48), 2)
    once = masks.invert(m)
    assert np.array_equal(np.asarray(once), 255 - np.asarray(m))
    assert np.array_equal(np.asarray(masks.invert(once)), np.asarray(m))


def test_feather_zero_is_identity_and_negative_raises():
    m = _square_mask()
    out = masks.feather(m, 0)
    assert out is not m and np.array_equal(np.asarray(out), np.asarray(m))
    with pytest.raises(ValueError, match=r"`radius` is the blur in pixels, 0 or more.*-1"):
        masks.feather(m, -1)


@pytest.mark.parametrize("radius", [1, 3])
def test_feather_makes_grey_only_near_the_edge(radius):
    a = np.asarray(masks.feather(_square_mask((64, 64), (20, 20, 44, 44)), radius)).astype(int)
    grey = (a > 0) & (a < 255)
    assert grey.any()
    ys, xs = np.nonzero(grey)
    # distance (Chebyshev) of each grey pixel from the square's edge, lines x=20, x=44, y=20, y=44 (pixel boundaries)
    inside_dist = np.minimum.reduce([xs - 20 + 0.5, 43.5 - xs, ys - 20 + 0.5, 43.5 - ys])
    outside_dist = np.maximum.reduce([20 - 0.5 - xs, xs - 43.5, 20 - 0.5 - ys, ys - 43.5])
    distance = np.where(inside_dist > 0, inside_dist, outside_dist)
    assert distance.max() <= 3 * radius + 1
    assert a[32, 32] == 255 and a[0, 0] == 0  # far inside and far outside unchanged


def test_binarize():
    m = Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8))
    assert np.asarray(masks.binarize(m)).tolist() == [[0, 0, 255, 255]]
    assert np.asarray(masks.binarize(m, threshold=1)).tolist() == [[0, 255, 255, 255]]
    with pytest.raises(ValueError, match="`threshold`.*300"):
        masks.binarize(m, 300)


# --- loading ------------------------------------------------------------------------------------------------------

def test_size_mismatch_is_resized_crisply_with_a_notice(capsys):
    m = masks.load_mask(_square_mask((50, 40), (10, 10, 30, 25)), size=(100, 80))
    assert m.size == (100, 80) and set(np.unique(np.asarray(m))) == {0, 255}  # NEAREST: no grey invented
    assert "mask 50x40 resized to the image's 100x80" in capsys.readouterr().out
    masks.load_mask(m, size=(100, 80))
    assert capsys.readouterr().out == ""


def test_rgba_brush_strokes_load_from_their_alpha(tmp_path):
    a = np.zeros((32, 32, 4), np.uint8)  # black brush: RGB uniform, alpha marks the strokes
    a[8:16, 8:24, 3] = 255
    Image.fromarray(a, "RGBA").save(tmp_path / "strokes.png")
    m = masks.load_mask(tmp_path / "strokes.png")
    assert m.mode == "L" and np.array_equal(np.asarray(m), a[..., 3])


def test_rgba_with_a_picture_uses_luminance_and_transparent_counts_black():
    a = np.zeros((16, 16, 4), np.uint8)
    a[..., :3] = 255
    a[:8, :, :3] = 0  # top half black, bottom half white
    a[..., 3] = 255
    opaque = np.asarray(masks.load_mask(Image.fromarray(a, "RGBA")))
    assert (opaque[:8] == 0).all() and (opaque[8:] == 255).all()
    a[12:, :, 3] = 0  # white but transparent: keep
    m = np.asarray(masks.load_mask(Image.fromarray(a, "RGBA")))
    assert (m[:8] == 0).all() and (m[8:12] == 255).all() and (m[12:] == 0).all()


def test_rgb_mask_loads_by_luminance(tmp_path):
    a = np.zeros((16, 16, 3), np.uint8)
    a[:, 8:] = 255
    a[0, 0] = (255, 0, 0)
    Image.fromarray(a).save(tmp_path / "m.png")
    m = np.asarray(masks.load_mask(tmp_path / "m.png"))
    assert (m[:, 8:] == 255).all() and m[1:, :8].max() == 0 and m[0, 0] == 76  # 0.299 * 255


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("L", (40, 20), 0)
    im.paste(255, (0, 0, 10, 20))  # the left quarter white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: the left becomes the top
    im.save(tmp_path / "m.png", exif=exif)
    m = np.asarray(masks.load_mask(tmp_path / "m.png"))
    assert m.shape == (40, 20) and (m[:10] == 255).all() and m[10:].max() == 0


def test_load_mask_names_missing_files_and_wrong_types(tmp_path):
    with pytest.raises(FileNotFoundError, match="No mask at"):
        masks.load_mask(tmp_path / "nope.png")
    with pytest.raises(TypeError, match="file path or a PIL image"):
        masks.load_mask(3)


# --- checks and preview -------------------------------------------------------------------------------------------

def test_check_mask_reports_empty_and_full():
    empty = masks.check_mask(Image.new("L", (8, 8), 0))
    assert empty.kind == "empty"
    assert "the mask is all black: nothing would change; paint the area to repaint white" in empty.message
    full = masks.check_mask(Image.new("L", (8, 8), 255))
    assert full.kind == "full" and "whole image will be repainted" in full.message
    assert masks.check_mask(_square_mask()) is None
    faint = masks.check_mask(Image.new("L", (8, 8), 40))  # the pipelines binarise at the middle: repaints nothing
    assert faint.kind == "empty" and "brightest pixel is 40" in faint.message


def test_preview_tints_only_the_masked_area():
    image = Image.new("RGB", (64, 64), (0, 100, 200))
    a = np.asarray(masks.preview(image, _square_mask(), color=(255, 0, 0), alpha=0.5))
    assert tuple(a[30, 30]) == (128, 50, 100) and tuple(a[5, 5]) == (0, 100, 200)
    with pytest.raises(ValueError, match="The mask is 32x32 but the image is 64x64"):
        masks.preview(image, Image.new("L", (32, 32)))


# --- only masked: crop_region, crop_for_inpaint, paste_back -------------------------------------------------------

def test_crop_region_pads_the_bounding_box():
    m = _square_mask((512, 512), (100, 100, 120, 120))
    assert masks.crop_region(m, 0) == (98, 98, 122, 122)  # 20 px grown to 24, the next multiple of 8, centred
    assert masks.crop_region(m, 10) == (90, 90, 130, 130)


def test_crop_region_is_clamped_at_the_borders():
    m = _square_mask((200, 120), (0, 110, 10, 120))  # bottom-left corner
    left, top, right, bottom = masks.crop_region(m, 32)
    assert left == 0 and bottom == 120 and (right, top) == (48, 72)  # 10 + 32 = 42 -> 48; 120 - 42 = 78 -> 72


def test_crop_region_matches_the_target_shape():
    m = _square_mask((512, 512), (200, 240, 240, 280))
    left, top, right, bottom = masks.crop_region(m, 8, target_size=(768, 512))
    w, h = right - left, bottom - top
    assert w % 8 == 0 and h % 8 == 0 and w / h == 1.5
    assert left <= 192 and top <= 232 and right >= 248 and bottom >= 288  # holds the padded mask


@pytest.mark.parametrize("seed", range(20))
def test_crop_region_properties_for_random_masks(seed):
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(64, 400)) // 8 * 8, int(rng.integers(64, 400)) // 8 * 8)
    mask = _random_mask(rng, size, float(rng.integers(0, 4)))
    padding = int(rng.integers(0, 40))
    target = (int(rng.integers(32, 129)) * 8, int(rng.integers(32, 129)) * 8)
    left, top, right, bottom = masks.crop_region(mask, padding, target)
    w, h = right - left, bottom - top
    assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]
    assert w % 8 == 0 and h % 8 == 0
    a = np.asarray(mask) > 0
    ys, xs = np.nonzero(a)
    assert left <= max(xs.min() - padding, 0) and right >= min(xs.max() + 1 + padding, size[0])
    assert top <= max(ys.min() - padding, 0) and bottom >= min(ys.max() + 1 + padding, size[1])
    ratio = target[0] / target[1]
    if w < size[0] and h < size[1]:  # not held back by the image's own edges: the shape matches to within 8 px
        assert abs(w - h * ratio) <= 8 * max(ratio, 1)


def test_crop_region_of_an_empty_mask_raises():
    with pytest.raises(ValueError, match="the mask is all black"):
        masks.crop_region(Image.new("L", (64, 64)), 8)


def test_crop_for_inpaint_sizes_and_checks():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 120, 3), np.uint8))
    mask = _square_mask((120, 100), (40, 30, 60, 50))
    image_crop, mask_crop, box = masks.crop_for_inpaint(image, mask, 8, (64, 64))
    assert image_crop.size == mask_crop.size == (64, 64) and box == masks.crop_region(mask, 8, (64, 64))
    assert set(np.unique(np.asarray(mask_crop))) == {0, 255}
    with pytest.raises(ValueError, match="has to be divisible by 8 but is 60x64. Use 64x64"):
        masks.crop_for_inpaint(image, mask, 8, (60, 64))
    with pytest.raises(ValueError, match=r"load_mask\(mask, size=image.size\)"):
        masks.crop_for_inpaint(image, _square_mask((60, 50)), 8, (64, 64))


@pytest.mark.parametrize("seed", range(6))
def test_paste_back_of_a_crop_keeps_every_unmasked_pixel(seed):
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(60, 200)), int(rng.integers(60, 200)))  # not multiples of 8
    original = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8))
    mask = _random_mask(rng, size, float(rng.integers(0, 4)))
    _, _, box = masks.crop_for_inpaint(original, mask, int(rng.integers(0, 32)), (64, 96))
    generated = Image.fromarray(rng.integers(0, 256, (96, 64, 3), np.uint8))
    result = masks.paste_back(original, generated, mask, box)

    out, orig, m = np.asarray(result), np.asarray(original), np.asarray(mask)
    assert result.size == original.size and result.mode == "RGB"
    keep = m == 0
    assert keep.any() and np.array_equal(out[keep], orig[keep])
    placed = np.array(orig)
    left, top, right, bottom = box
    placed[top:bottom, left:right] = np.asarray(generated.resize((right - left, bottom - top),
                                                                 Image.Resampling.LANCZOS))
    repaint = m == 255
    assert repaint.any() and np.array_equal(out[repaint], placed[repaint])
    grey = (m > 0) & (m < 255)
    low, high = np.minimum(orig, placed), np.maximum(orig, placed)
    assert ((out[grey] >= low[grey]) & (out[grey] <= high[grey])).all()


@pytest.mark.parametrize("seed", range(4))
def test_paste_back_of_a_whole_image_keeps_every_unmasked_pixel(seed):
    rng = np.random.default_rng(100 + seed)
    size = (int(rng.integers(60, 200)), int(rng.integers(60, 200)))
    original = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8))
    mask = _random_mask(rng, size, float(rng.integers(0, 4)))
    gen_size = (size[0] // 8 * 8, size[1] // 8 * 8) if seed % 2 else size  # the pipeline rounded it, or not
    generated = Image.fromarray(rng.integers(0, 256, (gen_size[1], gen_size[0], 3), np.uint8))
    out = np.asarray(masks.paste_back(original, generated, mask))
    orig, m = np.asarray(original), np.asarray(mask)
    expected_gen = np.asarray(generated.resize(size, Image.Resampling.LANCZOS) if gen_size != size else generated)
    assert np.array_equal(out[m == 0], orig[m == 0])
    assert np.array_equal(out[m == 255], expected_gen[m == 255])


def test_paste_back_refuses_a_mask_outside_its_box():
    original = Image.new("RGB", (64, 64))
    mask = _square_mask()
    with pytest.raises(ValueError, match="outside `box`"):
        masks.paste_back(original, Image.new("RGB", (8, 8)), mask, (0, 0, 32, 32))
