"""Opening and saving images: orientation and mode normalised on the way in, parameters kept on the way out."""
import os
import re
from pathlib import Path

from . import storage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_DOWNLOAD_BYTES = 50_000_000  # 50 MB: far above any photo a person would chat about
DOWNLOAD_TIMEOUT_S = 30
# What PIL raises for a broken or unsupported file (UnidentifiedImageError and "image file is truncated" are OSErrors).
_READ_ERRORS = (OSError, SyntaxError, EOFError, ValueError, IndexError)


def open_image(source, min_side: int = 8, max_pixels: int = 64_000_000):
    """An RGB PIL image (fully loaded, file closed) from `source`: a file path, an http(s) URL or a PIL image (not
    modified). EXIF orientation is applied, transparency becomes white, 16-bit images are scaled to 8 bits, and an
    animated file gives its first frame. A file that cannot be read, or is smaller than `min_side` px a side or larger
    than `max_pixels` pixels, raises ValueError naming it and saying what to do (FileNotFoundError for a missing path).
    """
    import io
    import warnings
    from contextlib import nullcontext

    from PIL import Image, UnidentifiedImageError

    fix = "Re-save it as PNG or JPEG."
    if isinstance(source, str):   # a pasted path or link: surrounding spaces and quotes are not part of it
        source = source.strip().strip("\"'").strip()
        if not source:
            raise ValueError("The image path is empty: type a file path (on Drive: /content/drive/MyDrive/...) or "
                             "an http(s) URL.")
    if isinstance(source, Image.Image):
        name = f"<PIL image {source.width}x{source.height} {source.mode}>"
    elif isinstance(source, str) and source.lower().startswith(("http://", "https://")):
        name, fix = source, "Check that the URL links to the image file itself, not to a web page."
        source = io.BytesIO(_download(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(path)
        if path.is_dir():
            raise ValueError(f"{name!r} is a folder, not an image file. Pass one image, or list_images({name!r}).")
        if not path.exists():
            raise FileNotFoundError(f"No image at {name!r}. Check the path (and that Drive is mounted).")
    else:
        raise TypeError(f"`source` must be a file path, an http(s) URL or a PIL image, not {type(source).__name__}.")

    try:
        with warnings.catch_warnings():  # PIL only warns between 1x and 2x its own pixel limit: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with (nullcontext(source) if isinstance(source, Image.Image) else Image.open(source)) as im:
                width, height = im.size  # from the header: no pixels decoded yet
                if min(width, height) >= min_side and width * height <= max_pixels:
                    return _to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"Image {name!r} is too large: {e} Resize it to at most {max_pixels:,} pixels "
                         "(PIL's own limit is Image.MAX_IMAGE_PIXELS).") from None
    except _READ_ERRORS as e:
        reason = "PIL does not recognise it as an image" if isinstance(e, UnidentifiedImageError) else e
        raise ValueError(f"Cannot read image {name!r}: {reason}. {fix}") from e
    if min(width, height) < min_side:
        raise ValueError(f"Image {name!r} is too small ({width}x{height} px): LLaVA needs at least {min_side} px a "
                         "side (`min_side`). Use a larger image.")
    raise ValueError(f"Image {name!r} is too large ({width}x{height} px = {width * height:,} pixels, more than "
                     f"max_pixels={max_pixels:,}). Resize it (LLaVA 1.6 scales it to 1344 px a side at most anyway), "
                     "or pass a larger `max_pixels` if you trust the file.")


def _to_rgb(im):
    """A new RGB image from the opened image `im`: decoded, EXIF-rotated, 16-bit scaled, transparency on white."""
    from PIL import Image, ImageOps

    im.load()  # decode every pixel now, so that a truncated file raises here instead of coming out half grey
    im = ImageOps.exif_transpose(im)  # always a new image: the caller's stays as it was
    if im.mode == "La":  # PIL's premultiplied LA converts to nothing else (found by tests/test_properties.py)
        im = im.convert("LA")
    if im.mode == "I" or im.mode.startswith("I;16"):  # 16-bit grey: convert("RGB") would clip all above 255 to white
        import numpy as np

        grey = np.asarray(im).clip(0, 65535) / 257
        im = Image.fromarray(grey.round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))  # transparency becomes white, not black
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def _download(url: str) -> bytes:
    """The bytes at `url` (at most MAX_DOWNLOAD_BYTES), or a ValueError naming the URL and the reason."""
    import http.client
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "llava-sd-notebooks (helpers.open_image)"})
    advice = "Check that it opens in a browser, or download the file and pass its path."
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise ValueError(f"Cannot download image {url!r}: HTTP {e.code} {e.reason}. {advice}") from None
    except (OSError, http.client.HTTPException) as e:  # URLError, refused, timed out, connection dropped
        raise ValueError(f"Cannot download image {url!r}: {getattr(e, 'reason', e)}. {advice}") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ValueError(f"Image {url!r} is larger than {MAX_DOWNLOAD_BYTES // 1_000_000} MB. Download it, shrink "
                         "it, and pass the smaller file's path.")
    return data


def list_images(folder, recursive: bool = True) -> list[Path]:
    """The image files in `folder` (and its subfolders if `recursive`), sorted, skipping hidden files and folders."""
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"Cannot list images in {str(folder)!r}: it {problem}. Pass the folder that holds the images.")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        found += [Path(root, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def save_image(image, folder, parameters: str | None = None, label: str = "") -> Path:
    """Save `image` as the next numbered PNG in `folder` (never overwriting), atomically, with `parameters` in the
    PNG "parameters" text chunk that A1111 and its readers use. Returns the path (where Drive fails: the path in the
    local fallback it went to, see storage.atomic_write)."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    try:
        path = storage.next_free_path(folder, ".png", label)
    except OSError as e:  # the folder cannot even be listed (Drive gone): numbered among the local fallback's files
        path = storage.next_free_path(storage.fallback_path(folder), ".png", label)
        print(f"Cannot use {folder} ({e}): saving to {path} on this machine's disk instead (lost when the session "
              "ends; see TROUBLESHOOTING.md#drive-write-fails).")
    return storage.atomic_write(path, buffer.getvalue())


# A1111's create_infotext order (v1.10): these fields first, in this order; any other field after them in the order
# given (A1111's extra_generation_params: Hires upscale, Hires steps, Hires upscaler, Lora hashes, Mask blur, ...);
# "Version" and "User" last.
INFOTEXT_ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration",
                  "Size", "Model hash", "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength",
                  "Seed resize from", "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD", "Tiling")
INFOTEXT_LAST = ("Version", "User")


def quote(value) -> str:
    """A value as A1111's infotext writes it: as it is, or JSON-quoted (non-ASCII kept) where it holds a comma, a
    colon or a line break. A quote alone is not quoted (`"masterpiece" style` stays as it is), as in A1111."""
    import json

    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def unquote(text: str) -> str:
    """A value as A1111 reads it back: a well-formed JSON string (starting and ending with a quote) is decoded, any
    other text is kept as written (never an error)."""
    import json

    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            decoded = json.loads(text)
        except ValueError:
            return text
        return decoded if isinstance(decoded, str) else text
    return text


def parameters_text(prompt: str, negative_prompt: str = "", **settings) -> str:
    """The A1111 "parameters" text: the prompt, a "Negative prompt:" line, then "Key: value" pairs in A1111's field
    order (INFOTEXT_ORDER), e.g. parameters_text("a cat", "blurry", Steps=25, Sampler="DPM++ 2M",
    Schedule_type="Karras", CFG_scale=7, Seed=1, Size="512x512"). Underscores in keys become spaces; None values are
    left out; a value with a comma, a colon or a line break is JSON-quoted (`quote`), as A1111's infotext does."""
    named = {key.replace("_", " "): value for key, value in settings.items() if value is not None}
    given = list(named)

    def rank(key):
        if key in INFOTEXT_ORDER:
            return 0, INFOTEXT_ORDER.index(key)
        return (2, INFOTEXT_LAST.index(key)) if key in INFOTEXT_LAST else (1, given.index(key))

    keys = sorted(given, key=rank)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(named[key])}" for key in keys))
    return "\n".join(lines)


# A1111's reading of the settings line: `key: value` pairs where a value is a quoted JSON-style string or the text up
# to the next comma (a quoted value that is not followed by a comma or the end is read as plain text).
_PAIR = re.compile(r'\s*(\w[\w ./+-]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict:
    """The A1111 "parameters" text read as A1111 reads it: "prompt", "negative_prompt" and each setting by its name,
    values as text (unquoted where they were quoted). Fields this kit does not use are kept too; nothing raises."""
    lines = str(text).strip().split("\n")
    settings = {}
    if len(_PAIR.findall(lines[-1])) >= 3:  # the last line holds the settings (A1111: three pairs or more)
        for key, value in _PAIR.findall(lines.pop()):
            settings[key.strip()] = unquote(value.strip())
    prompt, negative, into_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            into_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if into_negative else prompt).append(line)
    return {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip(), **settings}


def read_parameters(source) -> dict:
    """The A1111 parameters of a PNG (path or PIL image) as a dict (see parse_parameters): "prompt",
    "negative_prompt" and each setting by its A1111 name ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed",
    "Size", ...), values as text. Raises ValueError if the image carries none."""
    from PIL import Image

    if isinstance(source, Image.Image):
        text = source.info.get("parameters")
    else:
        with Image.open(source) as im:
            text = im.info.get("parameters")
    if not text:
        raise ValueError(f"{getattr(source, 'filename', None) or str(source)!r} carries no A1111 parameters (the PNG "
                         "'parameters' text): only PNGs saved by this project, A1111 or compatible tools do.")
    return parse_parameters(text)
