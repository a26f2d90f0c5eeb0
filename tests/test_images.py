import http.server
import io
import socket
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from helpers import images


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif)
    out = images.open_image(tmp_path / "r.jpg")
    assert out.size == (20, 40) and out.mode == "RGB"


def test_transparency_becomes_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "a.png")
    out = images.open_image(tmp_path / "a.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16"])
def test_modes_become_rgb(tmp_path, mode):
    path = tmp_path / f"m.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new(mode, (8, 8)).save(path)
    assert images.open_image(path).mode == "RGB"


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match=r"Cannot read image '.*broken\.png'"):
        images.open_image(tmp_path / "broken.png")
    with pytest.raises(FileNotFoundError, match="No image at"):
        images.open_image(tmp_path / "missing.png")


def test_saved_png_carries_its_parameters_and_never_overwrites(tmp_path):
    text = images.parameters_text("a cat", "blurry", Steps=4, CFG_scale=7.0, Seed=3, Size="64x64")
    assert text == "a cat\nNegative prompt: blurry\nSteps: 4, CFG scale: 7.0, Seed: 3, Size: 64x64"
    a = images.save_image(Image.new("RGB", (8, 8)), tmp_path, text, label="3")
    b = images.save_image(Image.new("RGB", (8, 8)), tmp_path, text, label="3")
    assert a != b and a.name == "00000-3.png" and b.name == "00001-3.png"
    with Image.open(a) as im:
        assert im.text["parameters"] == text


# --- open_image: every kind of input a person hands a LLaVA captioner or chat ---------------------------------------

def _png_bytes(width, height, bit_depth, color_type, raw_rows=None):
    """A PNG written byte by byte (for what PIL cannot write): IHDR, one IDAT of `raw_rows` (filter bytes included),
    IEND. With raw_rows=None the IDAT holds almost nothing: a header that promises pixels it does not have."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw_rows or b"\0" * 10))
            + chunk(b"IEND", b""))


def _noise(size=(64, 64)):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _half_of(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.mark.parametrize("name, data", [
    ("random.jpg", np.random.default_rng(1).bytes(2000)),
    ("half.jpg", _half_of(_noise(), "JPEG")),
    ("half.png", _half_of(_noise(), "PNG")),
])
def test_corrupt_and_truncated_files_are_rejected_not_half_grey(tmp_path, name, data):
    # Both halves open fine (the header is intact); only decoding the pixels finds the missing data.
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=rf"Cannot read image '.*{name}': .*Re-save it as PNG or JPEG\."):
        images.open_image(tmp_path / name)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # never switched on behind the caller's back


def test_cmyk_jpeg_keeps_its_colours(tmp_path):
    im = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan ...
    im.paste((0, 255, 0, 0), (8, 0, 16, 16))  # ... and pure magenta
    im.save(tmp_path / "cmyk.jpg", quality=95)
    out = images.open_image(tmp_path / "cmyk.jpg")
    assert out.mode == "RGB"
    assert np.allclose(out.getpixel((2, 8)), (0, 255, 255), atol=6)
    assert np.allclose(out.getpixel((13, 8)), (255, 0, 255), atol=6)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[65535, 32768, 0, 257]] * 8, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")  # Pillow writes uint16 as a 16-bit grey PNG
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode == "I;16" and im.convert("RGB").getpixel((1, 0)) == (255, 255, 255)  # PIL alone clips
    expected = [(255,) * 3, (128,) * 3, (0,) * 3, (1,) * 3]
    out = images.open_image(tmp_path / "grey16.png", min_side=1)
    assert out.mode == "RGB" and [out.getpixel((x, 0)) for x in range(4)] == expected
    # Mode "I" (32-bit ints: older Pillows read 16-bit PNGs that way, and it is what TIFF gives) is scaled the same.
    as_i = Image.fromarray(values.astype(np.int32))
    assert as_i.mode == "I"
    as_i.save(tmp_path / "grey32.tif")
    for source in (as_i, tmp_path / "grey32.tif"):
        out = images.open_image(source, min_side=1)
        assert [out.getpixel((x, 0)) for x in range(4)] == expected


def test_16_bit_rgb_png(tmp_path):
    # PIL has no 16-bit RGB mode, so it cannot write this file: it is written byte by byte. PIL reads it as "RGB"
    # from the high bytes, which is the right scaling.
    row = np.tile(np.array([65535, 32768, 0], dtype=">u2"), 8).tobytes()
    (tmp_path / "rgb16.png").write_bytes(_png_bytes(8, 8, 16, 2, (b"\0" + row) * 8))
    out = images.open_image(tmp_path / "rgb16.png")
    assert out.size == (8, 8) and out.mode == "RGB" and out.getpixel((7, 7)) == (255, 128, 0)


def test_palette_alpha_and_grey_modes(tmp_path):
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    palette.putpixel((0, 0), 2)
    palette.save(tmp_path / "p.png")
    palette.save(tmp_path / "p_transparent.png", transparency=1)  # index 1 (red) is see-through
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    Image.new("LA", (8, 8), (100, 255)).save(tmp_path / "la.png")
    Image.new("L", (8, 8), 100).save(tmp_path / "l.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "one.png")
    Image.new("L", (8, 8), 0).save(tmp_path / "l_transparent.png", transparency=0)  # a tRNS chunk, no alpha channel
    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "rgb_transparent.png", transparency=(0, 0, 0))

    out = {name: images.open_image(tmp_path / f"{name}.png") for name in
           ("p", "p_transparent", "rgba", "la", "l", "one", "l_transparent", "rgb_transparent")}
    assert all(im.mode == "RGB" and im.size == (8, 8) for im in out.values())
    assert out["p"].getpixel((0, 0)) == (0, 0, 255) and out["p"].getpixel((4, 4)) == (255, 0, 0)
    assert out["p_transparent"].getpixel((0, 0)) == (0, 0, 255) and out["p_transparent"].getpixel((4, 4)) == (255,) * 3
    assert np.allclose(out["rgba"].getpixel((4, 4)), (255, 127, 127), atol=1)  # half red on white
    assert out["la"].getpixel((4, 4)) == (100, 100, 100)
    assert out["l"].getpixel((4, 4)) == (100, 100, 100)
    assert out["one"].getpixel((4, 4)) == (255, 255, 255)
    assert out["l_transparent"].getpixel((4, 4)) == out["rgb_transparent"].getpixel((4, 4)) == (255, 255, 255)


@pytest.mark.parametrize("orientation, size, red_corner", [
    (3, (40, 20), "bottom right"),  # rotated 180
    (6, (20, 40), "top right"),  # rotated 90 clockwise
    (8, (20, 40), "bottom left"),  # rotated 90 counter-clockwise
])
def test_exif_orientation_moves_the_corners(tmp_path, orientation, size, red_corner):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 8, 8))  # red top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = images.open_image(tmp_path / "o.jpg")
    assert out.size == size
    w, h = size
    corners = {"top left": (2, 2), "top right": (w - 3, 2), "bottom left": (2, h - 3), "bottom right": (w - 3, h - 3)}
    for corner, xy in corners.items():
        r, g, b = out.getpixel(xy)
        assert (r > 200 and b < 50) == (corner == red_corner), (corner, out.getpixel(xy))


@pytest.mark.parametrize("ext", ["gif", "webp", "png"])
def test_animated_files_give_their_first_frame(tmp_path, ext):
    if ext == "webp" and not features.check("webp"):
        pytest.skip("this Pillow was built without WebP")
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    red.save(tmp_path / f"anim.{ext}", save_all=True, append_images=[blue], duration=100, loop=0, lossless=True)
    with Image.open(tmp_path / f"anim.{ext}") as im:
        assert im.n_frames == 2
    out = images.open_image(tmp_path / f"anim.{ext}")
    assert out.mode == "RGB" and out.size == (16, 16) and out.getpixel((8, 8)) == (255, 0, 0)


def test_too_small_images_are_refused(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(ValueError, match=r"'.*dot\.png' is too small \(1x1 px\): LLaVA needs at least 8 px a side"):
        images.open_image(tmp_path / "dot.png")
    Image.new("RGB", (100, 7)).save(tmp_path / "strip.png")
    with pytest.raises(ValueError, match=r"too small \(100x7 px\)"):
        images.open_image(tmp_path / "strip.png")
    assert images.open_image(tmp_path / "strip.png", min_side=7).size == (100, 7)
    Image.new("RGB", (8, 8)).save(tmp_path / "eight.png")
    assert images.open_image(tmp_path / "eight.png").size == (8, 8)


def test_too_large_images_are_refused_before_decoding(tmp_path):
    # The header says 9000x9000 (81 M pixels, under PIL's own limit) but no pixels follow: had open_image decoded
    # first, it would report a broken file instead of the size.
    (tmp_path / "huge.png").write_bytes(_png_bytes(9000, 9000, 8, 0))
    with pytest.raises(ValueError, match=r"'.*huge\.png' is too large \(9000x9000 px = 81,000,000 pixels, more "
                                         r"than max_pixels=64,000,000\)"):
        images.open_image(tmp_path / "huge.png")
    with pytest.raises(ValueError, match="Cannot read image"):  # allowed in: now the missing pixels are found
        images.open_image(tmp_path / "huge.png", max_pixels=10**8)
    Image.new("RGB", (100, 100)).save(tmp_path / "hundred.png")
    with pytest.raises(ValueError, match=r"too large \(100x100 px = 10,000 pixels, more than max_pixels=9,999\)"):
        images.open_image(tmp_path / "hundred.png", max_pixels=9_999)
    assert images.open_image(tmp_path / "hundred.png", max_pixels=10_000).size == (100, 100)


@pytest.mark.parametrize("side", [10_000, 20_000])  # PIL warns above 89.5 M pixels and refuses above 179 M
def test_pil_decompression_bomb_limits_become_the_same_message(tmp_path, side):
    (tmp_path / "bomb.png").write_bytes(_png_bytes(side, side, 8, 0))
    for max_pixels in (64_000_000, 10**9):  # PIL's own check runs first, even when max_pixels would allow it
        with pytest.raises(ValueError, match=rf"'.*bomb\.png' is too large: Image size \({side * side} pixels\) "
                                             r"exceeds limit .* Resize it to at most"):
            images.open_image(tmp_path / "bomb.png", max_pixels=max_pixels)


def test_folders_and_non_images_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"'.*' is a folder, not an image file"):
        images.open_image(tmp_path)
    (tmp_path / "notes.txt").write_text("a cat on a mat\n")
    with pytest.raises(ValueError, match=r"Cannot read image '.*notes\.txt': PIL does not recognise it as an image"):
        images.open_image(str(tmp_path / "notes.txt"))
    with pytest.raises(TypeError, match="not bytes"):
        images.open_image(b"\x89PNG")


def test_pil_images_are_converted_without_touching_the_callers(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = images.open_image(rgba)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (0, 0, 0, 0)

    rgb = Image.new("RGB", (8, 8), (1, 2, 3))
    out = images.open_image(rgb)
    out.putpixel((0, 0), (9, 9, 9))
    assert out is not rgb and rgb.getpixel((0, 0)) == (1, 2, 3)

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(tmp_path / "r.jpg", exif=exif)
    with Image.open(tmp_path / "r.jpg") as opened:
        assert images.open_image(opened).size == (20, 40)
        assert opened.size == (40, 20) and opened.getexif()[0x0112] == 6
    with pytest.raises(ValueError, match=r"Image '<PIL image 1x1 RGB>' is too small"):
        images.open_image(Image.new("RGB", (1, 1)))


# --- open_image from a URL: a web server on the loopback address, started and stopped by each test -----------------

@pytest.fixture
def web(tmp_path, monkeypatch):
    """(base URL, folder it serves, User-Agents it saw) for a server on 127.0.0.1 that serves `folder`."""
    site = tmp_path / "site"
    site.mkdir()
    user_agents = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(site), **kwargs)

        def do_GET(self):
            user_agents.append(self.headers.get("User-Agent"))
            super().do_GET()

        def log_message(self, *args):
            pass

    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy set in the environment must not see these requests
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", site, user_agents
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_url_images_are_downloaded(web):
    base, site, user_agents = web
    Image.new("RGBA", (12, 10), (0, 255, 0, 255)).save(site / "green.png")
    out = images.open_image(f"{base}/green.png")
    assert out.mode == "RGB" and out.size == (12, 10) and out.getpixel((5, 5)) == (0, 255, 0)
    assert user_agents and "llava-sd-notebooks" in user_agents[0]


def test_url_errors_name_the_url_and_the_reason(web, monkeypatch):
    base, site, _ = web
    with pytest.raises(ValueError, match=rf"Cannot download image '{base}/missing\.png': HTTP 404"):
        images.open_image(f"{base}/missing.png")
    (site / "page.html").write_text("<html><body>a cat</body></html>")
    with pytest.raises(ValueError, match=rf"Cannot read image '{base}/page\.html': .*not to a web page"):
        images.open_image(f"{base}/page.html")
    _noise().save(site / "noise.png")
    monkeypatch.setattr(images, "MAX_DOWNLOAD_BYTES", 1000)
    with pytest.raises(ValueError, match=rf"Image '{base}/noise\.png' is larger than 0 MB"):
        images.open_image(f"{base}/noise.png")


def test_unreachable_url_is_named():
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match=rf"Cannot download image 'http://127\.0\.0\.1:{port}/a\.png': .*refused"):
        images.open_image(f"http://127.0.0.1:{port}/a.png")


# --- list_images --------------------------------------------------------------------------------------------------

def test_list_images_finds_images_sorted_and_skips_hidden(tmp_path):
    for name in ["b.jpg", "a.PNG", "notes.txt", ".hidden.png", "sub/c.webp", "sub/deeper/e.TIFF",
                 ".ipynb_checkpoints/a-checkpoint.png", "sub/.cache/f.gif", "x.jpeg.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "folder.png").mkdir()  # a folder named like an image is not an image
    found = images.list_images(tmp_path)
    assert found == [tmp_path / "a.PNG", tmp_path / "b.jpg", tmp_path / "sub" / "c.webp",
                     tmp_path / "sub" / "deeper" / "e.TIFF"]
    assert images.list_images(str(tmp_path), recursive=False) == [tmp_path / "a.PNG", tmp_path / "b.jpg"]
    assert images.list_images(tmp_path / "sub" / "deeper") == [tmp_path / "sub" / "deeper" / "e.TIFF"]


def test_list_images_names_a_bad_folder(tmp_path):
    with pytest.raises(ValueError, match=r"Cannot list images in '.*nowhere': it does not exist"):
        images.list_images(tmp_path / "nowhere")
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"Cannot list images in '.*a\.png': it is not a folder"):
        images.list_images(tmp_path / "a.png")
