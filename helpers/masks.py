"""Inpainting masks, A1111-style (white = repaint, black = keep): load, draw, feather, check, crop and paste back.

Every mask here is a PIL image of mode "L" (0 = keep, 255 = repaint, values between blend). The functions take any
PIL image (or, where they load, a path) and return new images; the caller's are never modified. Only PIL and numpy
are used, imported inside the functions, so `import helpers.masks` stays light.

The "only masked" flow of A1111 ("inpaint area: only masked", with "padding"):

    mask = feather(load_mask(MASK_PATH, size=image.size), MASK_BLUR)
    if (problem := check_mask(mask)) and problem.kind == "empty":
        raise ValueError(problem.message)
    image_crop, mask_crop, box = crop_for_inpaint(image, mask, padding=32, size=(512, 512))
    generated = pipe(prompt=..., image=image_crop, mask_image=mask_crop, width=512, height=512).images[0]
    result = paste_back(image, generated, mask, box)   # every pixel where mask == 0 is the original's, byte for byte
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from PIL import Image

SHAPES = ("rectangle", "ellipse")


class MaskProblem(NamedTuple):
    """What check_mask() found: `kind` is "empty" (nothing would change: raise `message`) or "full" (the whole image
    is repainted: show `message`, carry on if that is what the person wants)."""
    kind: str
    message: str


# --- loading ----------------------------------------------------------------------------------------------------------

def load_mask(source, size: tuple[int, int] | None = None) -> Image.Image:
    """A mode "L" mask (white = repaint, black = keep) from `source`: a file path or a PIL image (not modified).

    Modes: L is taken as it is; 1, P, RGB, CMYK and the rest by their luminance (ITU-R 601, as PIL's convert("L"));
    16-bit grey is scaled to 8 bits. With transparency (RGBA, LA, PA, a P image with a transparent colour): where the
    colour is one uniform colour and only the alpha varies - strokes of one brush on a transparent layer, whatever the
    brush colour - the alpha is the mask (opaque = repaint); otherwise the luminance, with transparent pixels counting
    as black (luminance x alpha / 255), so an opaque RGBA mask reads like its RGB. EXIF orientation is applied, as
    helpers.images.open_image() does for the picture itself.

    If `size` (width, height) is given and differs, the mask is resized to it with NEAREST, and a notice is printed:
    nearest neighbour invents no grey levels, so a hard mask stays hard (softness is chosen with feather(), not left to
    the resampling filter) and a pixel's keep/repaint decision is never blurred across the edge.
    """
    from PIL import Image, ImageOps

    if isinstance(source, Image.Image):
        name = f"<PIL image {source.width}x{source.height} {source.mode}>"
        im = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(path)
        if path.is_dir():
            raise ValueError(f"Mask {name!r} is a folder, not an image file. Pass the mask image's path.")
        if not path.exists():
            raise FileNotFoundError(f"No mask at {name!r}. Check the path (and that Drive is mounted).")
        try:
            with Image.open(path) as opened:
                opened.load()
                im = opened.copy()
                im.info.update(opened.info)
        except (OSError, SyntaxError, EOFError, ValueError) as e:
            raise ValueError(f"Cannot read mask {name!r}: {e}. Re-save it as PNG (black = keep, white = repaint)."
                             ) from e
    else:
        raise TypeError(f"The mask must be a file path or a PIL image, not {type(source).__name__}.")

    mask = _to_l(ImageOps.exif_transpose(im))
    if size is not None:
        size = _check_size(size, "size")
        if mask.size != size:
            notice = f"mask {mask.width}x{mask.height} resized to the image's {size[0]}x{size[1]}"
            if abs(mask.width / mask.height - size[0] / size[1]) > 0.01 * size[0] / size[1]:
                notice += " (their shapes differ, so it is stretched: check that it is this image's mask)"
            print(notice)
            mask = mask.resize(size, Image.Resampling.NEAREST)
    return mask


def _to_l(im) -> Image.Image:
    """A new mode "L" image from `im`, by the rules in load_mask()."""
    import numpy as np
    from PIL import Image

    if im.mode == "L":
        return im.copy()
    if im.mode == "La":  # PIL's premultiplied LA converts to nothing else (found by tests/test_properties.py)
        im = im.convert("LA")
    if im.mode == "I" or im.mode.startswith("I;16"):  # 16-bit grey: convert("L") would clip all above 255 to white
        return Image.fromarray((np.asarray(im).clip(0, 65535) / 257).round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"))
        rgb, alpha = rgba[..., :3], rgba[..., 3]
        if (rgb == rgb[0, 0]).all() and not (alpha == alpha[0, 0]).all():
            return Image.fromarray(alpha.copy())
        luminance = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint32)
        return Image.fromarray(((luminance * alpha + 127) // 255).astype(np.uint8))
    if im.mode in ("1", "RGB"):
        return im.convert("L")
    return im.convert("RGB").convert("L")  # P, CMYK, YCbCr, LAB, HSV, F


def _as_mask(mask, what: str = "mask") -> Image.Image:
    """`mask` as a mode "L" image (any PIL image or path, converted by load_mask()'s rules)."""
    from PIL import Image

    if isinstance(mask, Image.Image) and mask.mode == "L":
        return mask
    if not isinstance(mask, (Image.Image, str, os.PathLike)):
        raise TypeError(f"`{what}` must be a PIL image (mode L: black = keep, white = repaint) or a file path, "
                        f"not {type(mask).__name__}.")
    return load_mask(mask)


def _check_size(size, what: str) -> tuple[int, int]:
    try:
        width, height = size
        ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in (width, height))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"`{what}` must be (width, height) in whole pixels above 0, but is {size!r}.")
    return int(width), int(height)


def _check_same_size(image, mask, what: str = "image") -> None:
    if image.size != mask.size:
        raise ValueError(f"The mask is {mask.width}x{mask.height} but the {what} is {image.width}x{image.height}. "
                         f"Load it with load_mask(mask, size={what}.size) to resize it.")


# --- drawing and editing ------------------------------------------------------------------------------------------

def shape_mask(size: tuple[int, int], shape: str = "rectangle", x: float = 0.25, y: float = 0.25,
               width: float = 0.5, height: float = 0.5) -> Image.Image:
    """A mask of `size` (width, height) px, white inside one `shape` ("rectangle" or "ellipse"), black elsewhere.

    `x`, `y` (the top-left corner) and `width`, `height` are fractions of the image, 0 to 1, so one slider setting
    marks the same area at any resolution. A shape that runs past the right or bottom edge is cut there. The edge is
    hard (every pixel 0 or 255): soften it with feather(). A pixel is inside when its centre is.
    """
    import numpy as np
    from PIL import Image

    size = _check_size(size, "size")
    if shape not in SHAPES:
        raise ValueError(f"`shape` must be one of {SHAPES}, not {shape!r}.")
    bad = {k: v for k, v in dict(x=x, y=y, width=width, height=height).items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1}
    if bad:
        listed = ", ".join(f"{k}={v!r}" for k, v in bad.items())
        raise ValueError(f"{listed}: `x`, `y`, `width` and `height` are fractions of the image, from 0 to 1 "
                         "(x=0.25, width=0.5 marks the middle half of its width).")
    w, h = size
    cx = np.arange(w) + 0.5  # pixel centres, in pixels
    cy = (np.arange(h) + 0.5)[:, None]
    left, right, top, bottom = x * w, min(x + width, 1) * w, y * h, min(y + height, 1) * h
    if shape == "rectangle":
        inside = (cx >= left) & (cx < right) & (cy >= top) & (cy < bottom)
    else:  # the ellipse of the full box (x, y, width, height), cut at the image's edge
        rx, ry = width * w / 2, height * h / 2
        if rx == 0 or ry == 0:
            inside = np.zeros((h, w), bool)
        else:
            inside = ((cx - (x * w + rx)) / rx) ** 2 + ((cy - (y * h + ry)) / ry) ** 2 <= 1
    return Image.fromarray(np.where(inside, 255, 0).astype(np.uint8))


def invert(mask) -> Image.Image:
    """The mask with keep and repaint swapped (each value v becomes 255 - v)."""
    from PIL import ImageOps

    return ImageOps.invert(_as_mask(mask))


def feather(mask, radius: float) -> Image.Image:
    """The mask with its edge softened by a Gaussian blur of `radius` px (A1111's "mask blur"); 0 leaves it as it
    is. The soft band spreads about 2.5 x radius px to each side of the edge, into the kept area too: compute crop boxes
    and paste back with the feathered mask, so that those pixels are included."""
    from PIL import ImageFilter

    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius >= 0:
        raise ValueError(f"`radius` is the blur in pixels, 0 or more (0 = a hard edge), not {radius!r}.")
    mask = _as_mask(mask)
    return mask.copy() if radius == 0 else mask.filter(ImageFilter.GaussianBlur(radius))


def binarize(mask, threshold: int = 128) -> Image.Image:
    """The mask with every value at or above `threshold` white (255) and every other black (0): a hard mask again,
    e.g. from a JPEG mask whose black is speckled with small values by compression."""
    import numpy as np
    from PIL import Image

    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 <= threshold <= 255:
        raise ValueError(f"`threshold` must be a whole number from 0 to 255, not {threshold!r} (128 is the middle).")
    return Image.fromarray(np.where(np.asarray(_as_mask(mask)) >= threshold, 255, 0).astype(np.uint8))


def check_mask(mask) -> MaskProblem | None:
    """None when the mask marks part of the image; otherwise a MaskProblem:

    - kind "empty": no pixel is 128 or more (the inpainting pipelines binarise the mask at the middle, so a mask this
      dark repaints nothing). Callers raise ValueError(problem.message).
    - kind "full": no pixel is below 128: the whole image is repainted, as img2img with the inpainting model would.
      Callers show problem.message and carry on.
    """
    import numpy as np

    values = np.asarray(_as_mask(mask))
    if values.max() < 128:
        faint = f"; its brightest pixel is {values.max()}, and only 128 or more counts" if values.max() else ""
        return MaskProblem("empty", "the mask is all black: nothing would change; paint the area to repaint white "
                                    f"(white = repaint, black = keep{faint}).")
    if values.min() >= 128:
        return MaskProblem("full", "the mask is all white: the whole image will be repainted, like img2img with the "
                                   "inpainting model; paint the areas to keep black if that is not what you want.")
    return None


def preview(image, mask, color: tuple[int, int, int] = (255, 0, 0), alpha: float = 0.5) -> Image.Image:
    """An RGB copy of `image` with the area to repaint tinted `color`, at `alpha` (0 to 1) where the mask is white
    and proportionally less where it is grey; the kept area is unchanged."""
    import numpy as np
    from PIL import Image

    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"`alpha` is the tint's opacity, from 0 to 1, not {alpha!r}.")
    try:
        ok = len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"`color` must be (red, green, blue), each 0 to 255, e.g. (255, 0, 0), not {color!r}.")
    mask = _as_mask(mask)
    _check_same_size(image, mask)
    rgb = np.asarray(image.convert("RGB")).astype(np.float64)
    weight = (np.asarray(mask).astype(np.float64) / 255 * alpha)[..., None]
    tinted = rgb * (1 - weight) + np.array(color, np.float64) * weight
    return Image.fromarray(tinted.round().clip(0, 255).astype(np.uint8))


# --- "only masked": crop around the mask, inpaint the crop, paste it back ------------------------------------------

def crop_region(mask, padding: int = 32, target_size: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) to crop for "inpaint area: only masked": the bounding box of every pixel
    that is not black (so a feathered edge is inside), grown by `padding` px on each side and clamped to the image,
    then widened or heightened, around its centre and shifted to stay inside the image, to the shape of
    `target_size` (width, height), the size the crop is processed at, so that resizing it does not distort it.

    Width and height are multiples of 8 (within the image: a side spanning a whole image side that is not a multiple
    of 8 is that side); the shape matches the target's to within 1% where a box up to 64 px taller allows, otherwise
    as nearly as it can, and as well as the image allows where the image itself is too narrow or too short for it.
    The box always holds every non-black pixel of the mask. An all-black mask raises ValueError.
    """
    import numpy as np

    mask = _as_mask(mask)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"`padding` is the context kept around the mask in pixels, 0 or more, not {padding!r}.")
    ratio = None
    if target_size is not None:
        tw, th = _check_size(target_size, "target_size")
        ratio = tw / th
    marked = np.asarray(mask) > 0
    if not marked.any():
        raise ValueError("the mask is all black: nothing would change; paint the area to repaint white "
                         "(white = repaint, black = keep).")
    W, H = mask.size
    cols, rows = np.flatnonzero(marked.any(axis=0)), np.flatnonzero(marked.any(axis=1))
    x0, x1 = max(int(cols[0]) - padding, 0), min(int(cols[-1]) + 1 + padding, W)
    y0, y1 = max(int(rows[0]) - padding, 0), min(int(rows[-1]) + 1 + padding, H)
    bw, bh = x1 - x0, y1 - y0

    w, h = _fit_box(bw, bh, W, H, ratio)
    left = min(max(math.floor((x0 + x1 - w) / 2), 0), W - w)
    top = min(max(math.floor((y0 + y1 - h) / 2), 0), H - h)
    return left, top, left + w, top + h


def _fit_box(bw: int, bh: int, W: int, H: int, ratio: float | None) -> tuple[int, int]:
    """The box size (multiples of 8 within W x H, at least bw x bh) nearest the shape `ratio` (width / height).

    Heights are tried from the least that fits, 8 px at a time (up to 64 px more), until the width that goes with
    one is within 1% of the shape: a 56 px tall region for a 3:2 target becomes 96x64 (exact), not 80x56 (5% off)."""
    if ratio is None:
        return _multiple_of_8(bw, bw, W), _multiple_of_8(bh, bh, H)
    best = None
    height = math.ceil(max(bh, bw / ratio) / 8) * 8
    for _ in range(9):
        h = _multiple_of_8(height, bh, H)
        w = _multiple_of_8(h * ratio, bw, W)
        h = _multiple_of_8(w / ratio, bh, H)  # the width hit the image's edge: shorten back toward the shape
        error = abs(w / (h * ratio) - 1)
        if best is None or error < best[0] - 1e-9:
            best = (error, w, h)
        if error <= 0.01 or height >= H:
            break
        height += 8
    return best[1], best[2]


def _multiple_of_8(value: float, low: int, high: int) -> int:
    """The multiple of 8 nearest `value` that is at least `low` and at most `high`; `high` where none is."""
    smallest, largest = -(-low // 8) * 8, high // 8 * 8
    if smallest > largest:
        return high
    return min(max(int(round(value / 8)) * 8, smallest), largest)


def crop_for_inpaint(image, mask, padding: int, size: tuple[int, int]):
    """(image_crop, mask_crop, box) for "inpaint area: only masked": the crop_region(mask, padding, size) of
    `image` and of `mask`, each resized to `size` (width, height; multiples of 8) for the pipeline. The image is
    resized with LANCZOS, the mask with NEAREST (it stays crisp; see load_mask). Give the generated crop, the same
    full-size `mask` and `box` to paste_back()."""
    from PIL import Image

    size = _check_size(size, "size")
    if size[0] % 8 or size[1] % 8:
        fix = "x".join(str(max(8, round(v / 8) * 8)) for v in size)
        raise ValueError(f"`size` (width, height) has to be divisible by 8 but is {size[0]}x{size[1]}. Use {fix}.")
    mask = _as_mask(mask)
    _check_same_size(image, mask)
    box = crop_region(mask, padding, size)
    image_crop = image.crop(box).resize(size, Image.Resampling.LANCZOS)
    return image_crop, mask.crop(box).resize(size, Image.Resampling.NEAREST), box


def paste_back(original, generated, mask, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The full image: `original` where the mask is black, `generated` where it is white, blended where it is grey.

    With `box` (from crop_region or crop_for_inpaint), `generated` is the inpainted crop: it is resized (LANCZOS) into
    the box first. Without, `generated` is the whole inpainted image, resized to the original's size if it differs
    (pipelines round sizes to multiples of 8). `mask` is the full-size mask the crop was made with (feathered or not).
    Every pixel where the mask is 0 is the original's, byte for byte; where it is 255, the generated one's. The result
    has the original's mode if that is L, RGB or RGBA (another, such as P, is converted to RGB first). A mask that is
    not black outside `box` raises ValueError: nothing was generated there.
    """
    import numpy as np
    from PIL import Image

    mask = _as_mask(mask)
    _check_same_size(original, mask, "original")
    if original.mode not in ("L", "RGB", "RGBA"):
        original = original.convert("RGB")
    generated = generated.convert(original.mode)
    if box is None:
        if generated.size != original.size:
            generated = generated.resize(original.size, Image.Resampling.LANCZOS)
        canvas = generated
    else:
        try:
            left, top, right, bottom = (int(v) for v in box)
            ok = 0 <= left < right <= original.width and 0 <= top < bottom <= original.height
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"`box` must be (left, top, right, bottom) inside the {original.width}x"
                             f"{original.height} original, as crop_region() returns, not {box!r}.")
        outside = np.asarray(mask).copy()
        outside[top:bottom, left:right] = 0
        if outside.any():
            raise ValueError(f"The mask marks {int((outside > 0).sum())} pixels outside `box` {box}, where nothing was "
                             "generated. Compute the box from the same (feathered) mask you paste back with.")
        canvas = original.copy()
        canvas.paste(generated.resize((right - left, bottom - top), Image.Resampling.LANCZOS), (left, top))
    old = np.asarray(original).astype(np.uint32)
    new = np.asarray(canvas).astype(np.uint32)
    m = np.asarray(mask).astype(np.uint32)
    if old.ndim == 3:
        m = m[..., None]
    blended = (old * (255 - m) + new * m + 127) // 255  # exact at the ends: m = 0 gives old, m = 255 gives new
    return Image.fromarray(blended.astype(np.uint8))
