import pytest
from PIL import Image

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
