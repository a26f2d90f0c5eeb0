"""Caption files as users really have them: other encodings, copies that fell back to local disk while Drive failed,
and two images that would share one `.txt` (issue 17, items 6, 9 and 10)."""
import codecs
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import captions, storage
from helpers.training import datasets as ds

TEXT = "café crème, sks dog"


def save_image(path: Path, size=(64, 64), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    """A dataset of three uncaptioned images in a repeats folder."""
    root = tmp_path / "data"
    for i in range(3):
        save_image(root / "5_sks dog" / f"img{i}.png", seed=i)
    return root


@pytest.fixture
def fake_model(monkeypatch):
    """caption_folder without LLaVA: every image gets "caption of <name>"; `calls` lists the images asked for."""
    calls = []

    def caption_batch(model, processor, images, *args):
        calls.extend(images)
        return [f"caption number {len(calls) - len(images) + i}" for i in range(len(images))]

    monkeypatch.setattr(captions, "caption_batch", caption_batch)
    return calls


def caption_folder(folder, **kwargs):
    return captions.caption_folder(folder, None, None, style="short", progress=False, **kwargs)


# ------------------------------------------------------------------------------------------------------- encodings

ENCODED = {
    "utf-8": TEXT.encode("utf-8"),
    "utf-8 with BOM": codecs.BOM_UTF8 + TEXT.encode("utf-8"),
    "utf-16-le with BOM": codecs.BOM_UTF16_LE + TEXT.encode("utf-16-le"),
    "utf-16-be with BOM": codecs.BOM_UTF16_BE + TEXT.encode("utf-16-be"),
}


@pytest.mark.parametrize("name", list(ENCODED))
def test_utf8_with_or_without_bom_and_utf16_with_bom_read_clean(folder, name):
    image = folder / "5_sks dog" / "img0.png"
    captions.caption_path(image).write_bytes(ENCODED[name] + "\r\nsecond line\r\n".encode(
        "utf-16-le" if "le" in name else "utf-16-be" if "be" in name else "utf-8"))
    assert captions.read_text_file(captions.caption_path(image))[0].splitlines()[0] == TEXT
    assert ds.read_caption(image) == TEXT  # no "\ufeff", no "\x00", no mojibake
    assert {i.path: i.caption for i in ds.find_items(folder)}[image] == TEXT
    assert captions.read_captions(folder)[image].startswith(TEXT)
    report = ds.check_dataset(folder, resolution=64, progress=False)
    assert report.ok and image not in report.uncaptioned and "ready to train" in str(report)


@pytest.mark.parametrize("data, why", [
    (TEXT.encode("cp1252"), "not UTF-8"),                     # latin-1 / Windows-1252: "caf� cr�me" if read as is
    (TEXT.encode("utf-16-le"), "NUL"),                         # UTF-16 without its BOM
    (b"sks dog\x00\x00", "NUL"),
    (codecs.BOM_UTF16_LE + b"a\x00b", "UTF-16"),               # a cut UTF-16 file (odd length)
])
def test_a_caption_in_another_encoding_is_named_with_the_fix_not_garbled(folder, data, why):
    image = folder / "5_sks dog" / "img1.png"
    txt = captions.caption_path(image)
    txt.write_bytes(data)

    report = ds.check_dataset(folder, resolution=64, progress=False)
    text = str(report)
    assert not report.ok and list(report.bad_captions) == [txt]
    assert "ready to train" not in text and "NOT READY" in text
    assert "5_sks dog/img1.txt" in text and why in text and "save it as UTF-8" in text
    assert image not in report.uncaptioned  # it has a caption, just not one we can read

    for read in (lambda: ds.find_items(folder), lambda: ds.read_caption(image), lambda: captions.read_captions(folder)):
        with pytest.raises(ValueError) as error:
            read()
        message = str(error.value)
        assert "\n" not in message and str(txt) in message and "save it as UTF-8" in message
        assert "TROUBLESHOOTING.md#caption-encoding" in message
    assert txt.read_bytes() == data  # nothing touched


def test_training_names_the_first_bad_caption_and_how_many_more(folder):
    for i in range(3):
        (folder / "5_sks dog" / f"img{i}.txt").write_bytes(TEXT.encode("cp1252"))
    with pytest.raises(ValueError, match=r"img0\.txt: it is not UTF-8 \(byte 0xE9 at position 3.*2 more caption file"):
        ds.find_items(folder)
    assert len(ds.check_dataset(folder, 64, progress=False).bad_captions) == 3


def test_caption_folder_keeps_an_unreadable_caption_and_names_it(folder, fake_model):
    txt = folder / "5_sks dog" / "img1.txt"
    txt.write_bytes(TEXT.encode("cp1252"))
    report = caption_folder(folder)
    assert sorted(p.name for p in report.written) == ["img0.png", "img2.png"]
    assert report.skipped == [folder / "5_sks dog" / "img1.png"] and txt.read_bytes() == TEXT.encode("cp1252")
    assert str(txt) in str(report) and "save it as UTF-8" in str(report)


@pytest.mark.parametrize("name", ["utf-8 with BOM", "utf-16-le with BOM", "utf-16-be with BOM"])
def test_a_rewritten_caption_keeps_the_users_encoding(folder, fake_model, name):
    image = folder / "5_sks dog" / "img0.png"
    txt = captions.caption_path(image)
    txt.write_bytes(ENCODED[name])
    bom = ENCODED[name][:len(ENCODED[name]) - len(TEXT.encode("utf-16-le" if "16" in name else "utf-8"))]

    captions.save_caption(image, "édité\ncaption")
    assert txt.read_bytes().startswith(bom) and txt.read_bytes()[len(bom):len(bom) + 1] != bom[:1]
    assert captions.read_text_file(txt) == ("édité caption\n", captions.read_text_file(txt)[1])
    assert ds.read_caption(image) == "édité caption"

    caption_folder(folder, overwrite=True)
    assert txt.read_bytes().startswith(bom) and ds.read_caption(image).startswith("caption number")


def test_rewriting_a_caption_of_unknown_encoding_says_it_converted(folder, capsys):
    image = folder / "5_sks dog" / "img0.png"
    txt = captions.caption_path(image)
    txt.write_bytes(TEXT.encode("cp1252"))
    captions.save_caption(image, TEXT)
    assert txt.read_bytes() == (TEXT + "\n").encode("utf-8")
    out = capsys.readouterr().out
    assert str(txt) in out and "UTF-8" in out and "converted" in out


def test_a_plain_utf8_caption_stays_plain(folder):
    image = folder / "5_sks dog" / "img0.png"
    captions.save_caption(image, TEXT)
    assert captions.caption_path(image).read_bytes() == (TEXT + "\n").encode("utf-8")


def test_a_newline_never_cuts_a_caption(folder, monkeypatch):
    monkeypatch.setattr(captions, "caption_batch",
                        lambda m, p, images, *a: ["a dog\nsecond line\r\nthird"] * len(images))
    caption_folder(folder, trigger="sks")
    for txt in (folder / "5_sks dog").glob("*.txt"):
        assert txt.read_text() == "sks, a dog second line third\n"
    before = {p: p.read_bytes() for p in folder.rglob("*.txt")}
    with pytest.raises(ValueError, match="line break"):
        caption_folder(folder, trigger="sks\ndog", overwrite=True)
    assert {p: p.read_bytes() for p in folder.rglob("*.txt")} == before  # refused before anything was written
    captions.save_caption(folder / "5_sks dog" / "img0.png", "one\u2028two\nthree")
    assert (folder / "5_sks dog" / "img0.txt").read_text() == "one two three\n"


# ------------------------------------------------------------------------------------------------ fallback captions

@pytest.fixture
def drive_down(folder, tmp_path, monkeypatch):
    """Every write inside the dataset folder fails, as on a Drive that dropped; the fallback is tmp_path/fallback."""
    real = storage._write_once
    monkeypatch.setattr(storage, "WRITE_RETRY_DELAYS_S", ())
    monkeypatch.setattr(storage, "LOCAL_FALLBACK", tmp_path / "fallback")

    def write_once(path, data, encoding):
        if Path(path).absolute().is_relative_to(folder.absolute()):
            raise OSError(107, "Transport endpoint is not connected")
        return real(path, data, encoding)

    write_once.real = real
    monkeypatch.setattr(storage, "_write_once", write_once)
    return tmp_path / "fallback"


def test_captions_that_fell_back_to_local_disk_are_found_and_said(folder, fake_model, drive_down, capsys):
    report = caption_folder(folder)
    assert len(report.written) == 3 and not report.failed
    images = sorted((folder / "5_sks dog").glob("*.png"))
    assert not list(folder.rglob("*.txt"))  # nothing beside the images: Drive is down
    for image in images:
        assert storage.fallback_path(captions.caption_path(image)).is_file()
    capsys.readouterr()

    fake_model.clear()
    again = caption_folder(folder)
    assert fake_model == [] and again.written == [] and sorted(again.skipped) == images  # not captioned again
    out = capsys.readouterr().out
    assert "3 caption(s)" in out and str(drive_down) in out and "lost" in out
    assert out.count("fallback") >= 1 and out.count("\n") == 1  # said once

    items = ds.find_items(folder)
    assert [i.caption for i in items] == ["caption number 0", "caption number 1", "caption number 2"]
    out = capsys.readouterr().out
    assert "3 caption(s)" in out and str(drive_down) in out and "TROUBLESHOOTING.md#fallback-captions" in out
    assert list(captions.read_captions(folder).values()) == [i.caption for i in items]

    report = ds.check_dataset(folder, resolution=64, progress=False)
    assert report.ok and not report.uncaptioned and sorted(report.fallback_captions) == images
    assert "fallback" in str(report) and "ready to train" in str(report)


def test_the_newer_of_the_caption_beside_and_its_fallback_copy_wins(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "LOCAL_FALLBACK", tmp_path / "fallback")
    image = folder / "5_sks dog" / "img0.png"
    beside = captions.caption_path(image)
    copy = storage.fallback_path(beside)
    copy.parent.mkdir(parents=True)
    beside.write_text("old caption\n")
    copy.write_text("new caption\n")
    os.utime(beside, (1_000_000, 1_000_000))
    assert ds.read_caption(image) == "new caption"
    beside.write_text("edited again\n")  # now the newer one
    os.utime(copy, (1_000_000, 1_000_000))
    assert ds.read_caption(image) == "edited again"
    beside.write_text("  \n")            # an empty caption beside does not hide the copy
    assert ds.read_caption(image) == "new caption"


def test_saving_a_caption_once_drive_works_puts_it_back_beside_the_image(folder, fake_model, drive_down, monkeypatch):
    caption_folder(folder)
    monkeypatch.setattr(storage, "_write_once", storage._write_once.real)  # Drive is back
    found = captions.restore_fallback_captions(folder)
    images = sorted((folder / "5_sks dog").glob("*.png"))
    assert found == [captions.caption_path(p) for p in images]
    for i, image in enumerate(images):
        assert captions.caption_path(image).read_text() == f"caption number {i}\n"
        assert not storage.fallback_path(captions.caption_path(image)).exists()
    assert ds.read_caption(images[0]) == "caption number 0"


# -------------------------------------------------------------------------------------- two images, one .txt

def test_two_images_sharing_one_caption_file_are_refused_before_captioning(folder, fake_model):
    sub = folder / "5_sks dog"
    save_image(sub / "img0.jpg", seed=9)
    save_image(folder / "1_cat" / "img0.webp", seed=8)  # another folder: its own img0.txt, fine
    with pytest.raises(ValueError) as error:
        caption_folder(folder)
    message = str(error.value)
    assert "\n" not in message and "img0.png" in message and "img0.jpg" in message and "rename" in message
    assert "TROUBLESHOOTING.md#same-stem-images" in message and "img0.webp" not in message
    assert fake_model == [] and not list(folder.rglob("*.txt"))  # nothing captioned, nothing written

    with pytest.raises(ValueError, match=r"img0\.jpg.*img0\.png.*rename|img0\.png.*img0\.jpg.*rename"):
        ds.find_items(folder)
    with pytest.raises(ValueError, match="rename"):
        captions.read_captions(folder)
    report = ds.check_dataset(folder, resolution=64, progress=False)
    assert not report.ok and report.same_stem == [[sub / "img0.jpg", sub / "img0.png"]]
    text = str(report)
    assert "NOT READY" in text and "5_sks dog/img0.jpg" in text and "5_sks dog/img0.png" in text
    assert "rename" in text and "img0.txt" in text

    (sub / "img0.jpg").rename(sub / "img0b.jpg")  # the fix
    assert len(caption_folder(folder).written) == 5 and ds.check_dataset(folder, 64, progress=False).ok
