"""Opening and saving images: orientation and mode normalised on the way in, parameters kept on the way out."""
from pathlib import Path

from . import storage


def open_image(path):
    """An RGB PIL image from `path`, with its EXIF orientation applied. Errors name the file and say why."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                background = Image.new("RGB", im.size, (255, 255, 255))  # transparency becomes white, not black
                background.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
                return background
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"No image at {str(path)!r}.") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"Cannot read image {str(path)!r}: {e}. Re-save it as PNG or JPEG.") from e


def save_image(image, folder, parameters: str | None = None, label: str = "") -> Path:
    """Save `image` as the next numbered PNG in `folder` (never overwriting), atomically, with `parameters` in the
    PNG "parameters" text chunk that A1111 and its readers use. Returns the path."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    path = storage.next_free_path(folder, ".png", label)
    with storage.atomic_open(path, "wb") as f:
        image.save(f, format="PNG", pnginfo=info)
    return path


def parameters_text(prompt: str, negative_prompt: str = "", **settings) -> str:
    """The A1111 "parameters" text: the prompt, a "Negative prompt:" line, then "Key: value" pairs, e.g.
    parameters_text("a cat", "blurry", Steps=25, Sampler="PNDM", CFG_scale=7, Seed=1, Size="512x512")."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in settings.items()))
    return "\n".join(lines)
