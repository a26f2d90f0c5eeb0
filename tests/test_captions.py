import os

import numpy as np
import pytest
from PIL import Image

from helpers import captions, loading


@pytest.fixture(scope="module")
def llava():
    return loading.load_llava("llava-1.6-mistral-7b")


@pytest.fixture
def dataset(tmp_path):
    """A kohya-style folder: images in a repeat sub-folder, one unreadable file, one non-image."""
    sub = tmp_path / "10_sks dog"
    sub.mkdir()
    for i, (w, h) in enumerate([(64, 48), (32, 64), (48, 48)]):
        Image.fromarray((np.random.RandomState(i).rand(h, w, 3) * 255).astype("uint8")).save(sub / f"img{i}.png")
    (sub / "broken.jpg").write_bytes(b"not an image at all")
    (sub / "notes.md").write_text("not an image")
    return tmp_path


def test_one_caption_per_image_and_the_run_resumes(llava, dataset):
    report = captions.caption_folder(dataset, *llava, style="short", trigger="sks dog", batch_size=2, progress=False)
    sub = dataset / "10_sks dog"
    assert sorted(p.name for p in report.written) == ["img0.png", "img1.png", "img2.png"]
    assert list(report.failed) == [sub / "broken.jpg"] and "Cannot read image" in report.failed[sub / "broken.jpg"]
    for i in range(3):
        text = (sub / f"img{i}.txt").read_text()
        assert text.startswith("sks dog, ") and text.endswith("\n") and text.count("\n") == 1
    stamps = {p: os.stat(p).st_mtime_ns for p in sub.glob("*.txt")}
    again = captions.caption_folder(dataset, *llava, style="short", progress=False)
    assert again.written == [] and len(again.skipped) == 3
    assert {p: os.stat(p).st_mtime_ns for p in sub.glob("*.txt")} == stamps  # nothing rewritten
    assert "0 caption(s) written, 3 skipped" in str(again)


def test_overwrite_and_an_empty_caption_counts_as_missing(llava, dataset):
    sub = dataset / "10_sks dog"
    (sub / "img0.txt").write_text("my own caption\n")
    (sub / "img1.txt").write_text("  \n")
    report = captions.caption_folder(dataset, *llava, style="tags", progress=False)
    assert sorted(p.name for p in report.written) == ["img1.png", "img2.png"]
    assert (sub / "img0.txt").read_text() == "my own caption\n"
    report = captions.caption_folder(dataset, *llava, style="tags", overwrite=True, progress=False)
    assert len(report.written) == 3


def test_batched_captions_equal_one_by_one(llava):
    images = [Image.fromarray((np.random.RandomState(i).rand(48, 40 + 8 * i, 3) * 255).astype("uint8"))
              for i in range(3)]
    batched = captions.caption_batch(*llava, images, style="short")
    single = [captions.caption_batch(*llava, [im], style="short")[0] for im in images]
    assert batched == single


def test_a_failed_batch_is_reported_and_the_run_goes_on(llava, dataset, monkeypatch):
    calls = []

    def flaky(model, processor, images, *args):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return ["a caption"] * len(images)

    monkeypatch.setattr(captions, "caption_batch", flaky)
    report = captions.caption_folder(dataset, *llava, batch_size=2, progress=False)
    # batches: [broken.jpg (unreadable), img0] -> the failing call; [img1, img2] -> written
    assert sorted(p.name for p in report.written) == ["img1.png", "img2.png"] and len(report.failed) == 2
    assert any("CUDA out of memory" in why for why in report.failed.values())


@pytest.mark.parametrize("raw, style, max_chars, expected", [
    ("A dog.\n\nIt runs  fast.", "detailed", None, "A dog. It runs fast."),
    ("A dog on grass. It runs fast. The sky is blue.", "detailed", 33, "A dog on grass. It runs fast."),
    ("1. Dog\n2. grass, Dog, blue sky.", "tags", None, "dog, grass, blue sky"),
    ("dog, grass, blue sky, sunny", "tags", 16, "dog, grass"),
])
def test_clean_caption(raw, style, max_chars, expected):
    assert captions.clean_caption(raw, style, max_chars) == expected


def test_bad_arguments(llava, tmp_path):
    with pytest.raises(ValueError, match="Unknown caption style 'long'; known: short, detailed, tags"):
        captions.caption_folder(tmp_path, *llava, style="long")
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, not 0"):
        captions.caption_folder(tmp_path, *llava, batch_size=0)
    with pytest.raises(ValueError, match="no_such"):
        captions.caption_folder(tmp_path / "no_such", *llava)


def test_review_helpers_round_trip(dataset):
    sub = dataset / "10_sks dog"
    captions.save_caption(sub / "img0.png", "edited\ncaption ")
    found = captions.read_captions(dataset)
    assert found[sub / "img0.png"] == "edited caption" and found[sub / "img1.png"] == ""
