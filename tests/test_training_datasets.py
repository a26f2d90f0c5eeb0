"""Training datasets: kohya folders, the pre-flight report, zips and Drive links, captions, buckets, crops, batches."""
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.training import datasets as ds


def save_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def kohya(tmp_path):
    """10_sks dog/ (2 captioned images, one 2:1), 1_dog/ (1 uncaptioned), one image at the top, captioned."""
    root = tmp_path / "train"
    save_image(root / "10_sks dog" / "a.png", 96, 48, seed=1)
    (root / "10_sks dog" / "a.txt").write_text("sks dog, on grass, red collar\n")
    save_image(root / "10_sks dog" / "b.jpg", 64, 64, seed=2)
    (root / "10_sks dog" / "b.txt").write_text("\n  sks dog sitting  \nsecond line\n")
    save_image(root / "1_dog" / "c.png", 48, 64, seed=3)
    save_image(root / "top.png", 64, 64, seed=4)
    (root / "top.txt").write_text("a landscape")
    return root


# ----------------------------------------------------------------------------------------------------- find_items

def test_repeats_concepts_and_captions_come_from_the_kohya_layout(kohya):
    items = {item.path.name: item for item in ds.find_items(kohya, trigger="sks", default_repeats=3)}
    assert sorted(items) == ["a.png", "b.jpg", "c.png", "top.png"]
    assert (items["a.png"].repeats, items["a.png"].concept) == (10, "sks dog")
    assert items["a.png"].caption == "sks dog, on grass, red collar"
    assert items["b.jpg"].caption == "sks dog sitting"  # kohya reads the first (non-empty) line
    assert (items["c.png"].repeats, items["c.png"].concept, items["c.png"].caption) == (1, "dog", "")
    assert (items["top.png"].repeats, items["top.png"].concept) == (3, "sks")  # default repeats, the trigger


def test_zero_repeats_and_an_empty_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"No images in .*'10_sks dog'"):
        ds.find_items(tmp_path)
    save_image(tmp_path / "0_cat" / "x.png", 32, 32)
    with pytest.raises(ValueError, match=r"Folder '0_cat' asks for 0 repeats.*'1_cat'"):
        ds.find_items(tmp_path)
    with pytest.raises(ValueError, match="`default_repeats` must be an integer >= 1, not 0"):
        ds.find_items(tmp_path, default_repeats=0)


# -------------------------------------------------------------------------------------------------- check_dataset

def test_the_report_names_every_kind_of_bad_file(kohya):
    (kohya / "10_sks dog" / "broken.png").write_bytes(b"not an image at all")
    save_image(kohya / "1_dog" / "thin.png", 200, 40, seed=5)
    (kohya / "1_dog" / "thin.txt").write_text("a thin dog")
    (kohya / "1_dog" / "gone.txt").write_text("the image of this caption was deleted")
    (kohya / ".cache").mkdir()
    (kohya / ".cache" / "hidden.txt").write_text("not a caption")

    report = ds.check_dataset(kohya, resolution=128, progress=False)  # min_side: 128 // 2 = 64
    assert not report.ok and report.min_side == 64
    assert list(report.unreadable) == [kohya / "10_sks dog" / "broken.png"]
    assert report.too_small == {kohya / "10_sks dog" / "a.png": (96, 48), kohya / "1_dog" / "c.png": (48, 64),
                                kohya / "1_dog" / "thin.png": (200, 40)}
    assert report.orphan_captions == [kohya / "1_dog" / "gone.txt"]
    assert set(report.uncaptioned) == {kohya / "1_dog" / "c.png", kohya / "10_sks dog" / "broken.png"}
    text = str(report)
    assert "NOT READY" in text
    assert "10_sks dog/broken.png: Cannot read image" in text
    assert "1_dog/thin.png: 200x40 px" in text and "smaller than 64 px a side" in text
    assert "1_dog/gone.txt" in text and "notebook 02" in text and "hidden.txt" not in text


def test_a_clean_folder_is_ok_and_warnings_do_not_block(kohya):
    report = ds.check_dataset(kohya, resolution=64, min_side=40, progress=False)
    assert report.ok and not report.unreadable and not report.too_small
    assert report.uncaptioned == [kohya / "1_dog" / "c.png"]  # a warning only
    assert report.sizes[kohya / "10_sks dog" / "a.png"] == (96, 48)
    assert "ready to train" in str(report) and "1_dog/c.png" in str(report)


def test_no_images_at_all_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("a caption without any image")
    with pytest.raises(ValueError, match=r"No images in .*Put the training images there"):
        ds.check_dataset(tmp_path, resolution=512)


# ------------------------------------------------------------------------------------------------- prepare_folder

def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def png_bytes(width=32, height=32) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_local_folder_is_used_as_is(kohya, tmp_path):
    assert ds.prepare_folder(kohya, tmp_path / "unused") == kohya and not (tmp_path / "unused").exists()


def test_a_zip_is_extracted_and_a_wrapping_folder_is_entered(tmp_path):
    archive = make_zip(tmp_path / "dog.zip", {"dataset/10_sks dog/a.png": png_bytes(), "dataset/10_sks dog/a.txt":
                                              b"sks dog", "__MACOSX/dataset/._a.png": b"junk"})
    root = ds.prepare_folder(archive, tmp_path / "out")
    assert root == tmp_path / "out" / "dataset" and not (tmp_path / "out" / "__MACOSX").exists()
    [item] = ds.find_items(root)
    assert (item.repeats, item.concept, item.caption) == (10, "sks dog", "sks dog")

    # a zip of the repeats folder itself: that folder's name carries the repeats, so it is not entered
    archive = make_zip(tmp_path / "flat.zip", {"5_cat/b.png": png_bytes()})
    root = ds.prepare_folder(str(archive), tmp_path / "flat")
    assert root == tmp_path / "flat" and ds.find_items(root)[0].repeats == 5


@pytest.mark.parametrize("member", ["../evil.png", "ok/../../evil.png", "/etc/evil.png", "..\\evil.png",
                                    "C:/evil.png"])
def test_zip_slip_is_refused_before_anything_is_written(tmp_path, member):
    archive = make_zip(tmp_path / "evil.zip", {"fine/a.png": png_bytes(), member: b"payload"})
    with pytest.raises(ValueError, match=rf"holds the member {re.escape(repr(member))}.*zip-slip"):
        ds.prepare_folder(archive, tmp_path / "out" / "inner")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.png").exists()


def test_bad_sources(tmp_path):
    (tmp_path / "photo.txt").write_text("not a zip")
    with pytest.raises(ValueError, match="is a file but not a .zip"):
        ds.prepare_folder(tmp_path / "photo.txt", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="No dataset at"):
        ds.prepare_folder(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="is not a Google Drive link"):
        ds.prepare_folder("https://example.org/data.zip", tmp_path / "out")


def test_drive_file_link_to_a_zip_and_drive_folder_link(monkeypatch, tmp_path):
    import gdown

    calls = []

    def fake_download(id, output, quiet):
        calls.append(("file", id))
        assert output.endswith("/")
        return str(make_zip(Path(output) / "dataset.zip", {"pics/3_cat/a.png": png_bytes()}))

    def fake_download_folder(id, output, quiet):
        calls.append(("folder", id))
        return [str(save_image(Path(output) / "2_dog" / "b.png", 32, 32))]

    monkeypatch.setattr(gdown, "download", fake_download)
    monkeypatch.setattr(gdown, "download_folder", fake_download_folder)
    root = ds.prepare_folder("https://drive.google.com/file/d/1AbCdEfGhIjKlMnOp/view?usp=sharing", tmp_path / "z")
    assert root == tmp_path / "z" / "pics" and ds.find_items(root)[0].repeats == 3
    assert not list((tmp_path / "z").rglob("*.zip"))  # the archive is removed once extracted
    root = ds.prepare_folder("https://drive.google.com/drive/folders/1ZyXwVuTsRqPoNm?usp=sharing", tmp_path / "f")
    assert root == tmp_path / "f" and ds.find_items(root)[0].concept == "dog"
    assert calls == [("file", "1AbCdEfGhIjKlMnOp"), ("folder", "1ZyXwVuTsRqPoNm")]

    monkeypatch.setattr(gdown, "download", lambda id, output, quiet: None)  # what gdown returns for a private file
    with pytest.raises(ValueError, match="did not hand over.*anyone with the link"):
        ds.prepare_folder("https://drive.google.com/file/d/1AbCdEfGhIjKlMnOp/view", tmp_path / "p")


# ------------------------------------------------------------------------------------------------------- captions

def test_trigger_goes_first_once():
    assert ds.build_caption("on grass, red collar", "sks") == "sks, on grass, red collar"
    assert ds.build_caption("on grass, sks, red collar", "sks") == "sks, on grass, red collar"  # moved, not doubled
    assert ds.build_caption("a photo of sks dog on grass", "sks") == "a photo of sks dog on grass"  # present already
    assert ds.build_caption("a photo of sksx", "sks") == "sks, a photo of sksx"  # a word, not a substring
    assert ds.build_caption("", "sks") == "sks" and ds.build_caption(" , ,", None) == ""


def test_shuffle_keeps_the_first_tokens_and_is_deterministic():
    caption = "sks, t1, t2, t3, t4, t5, t6, t7"
    outputs = [ds.build_caption(caption, "sks", shuffle=True, keep_tokens=2, rng=random.Random(s)) for s in range(20)]
    for out in outputs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "t1"] and sorted(tags[2:]) == ["t2", "t3", "t4", "t5", "t6", "t7"]
    assert len(set(outputs)) > 10  # the rest really is shuffled
    again = [ds.build_caption(caption, "sks", shuffle=True, keep_tokens=2, rng=random.Random(s)) for s in range(20)]
    assert again == outputs
    # the trigger stays first even with keep_tokens=0
    assert all(ds.build_caption("a, b, c", "sks", shuffle=True, keep_tokens=0, rng=random.Random(s)).startswith("sks")
               for s in range(10))


def test_caption_dropout_rate_is_honoured_and_drops_everything():
    rng = random.Random(0)
    dropped = sum(ds.build_caption("sks, on grass", "sks", dropout=0.2, rng=rng) == "" for _ in range(5000))
    assert 0.18 < dropped / 5000 < 0.22
    assert ds.build_caption("sks", "sks", dropout=1.0, rng=random.Random(1)) == ""
    with pytest.raises(ValueError, match="`dropout` is a probability between 0 and 1, not 1.5"):
        ds.build_caption("x", dropout=1.5, rng=random.Random(0))
    with pytest.raises(ValueError, match="`rng` is needed"):
        ds.build_caption("x, y", shuffle=True)


# -------------------------------------------------------------------------------------------------------- buckets

@pytest.mark.parametrize("resolution, step", [(512, 64), (1024, 64), (256, 32)])
def test_buckets_respect_the_area_and_the_step(resolution, step):
    buckets = ds.make_buckets(resolution, step=step)
    assert (resolution, resolution) in buckets and len(buckets) > 5
    for width, height in buckets:
        assert width * height <= resolution ** 2 and width % step == 0 and height % step == 0
        assert resolution // 2 <= min(width, height) and max(width, height) <= 2 * resolution
        assert (height, width) in buckets
    assert ds.make_buckets(512) == ds.make_buckets(512, min_side=256, max_side=1024)
    assert (256, 1024) in ds.make_buckets(512)  # kohya's default range: 1:4 at most


def test_images_land_in_the_bucket_of_their_shape():
    buckets = ds.make_buckets(512)
    wide = ds.assign_bucket(2000, 1000, buckets)
    assert wide[0] > wide[1] and 1.8 <= wide[0] / wide[1] <= 2.3
    tall = ds.assign_bucket(1000, 2000, buckets)
    assert tall == (wide[1], wide[0])
    assert ds.assign_bucket(777, 777, buckets) == (512, 512)
    groups = ds.group_by_bucket([("w", (2000, 1000)), ("s", (300, 300)), ("w2", (1600, 800)), ("t", (10, 40))],
                                buckets)
    assert groups == {(256, 1024): ["t"], (512, 512): ["s"], wide: ["w", "w2"]}


def test_bad_bucket_settings_are_named():
    with pytest.raises(ValueError, match="`resolution` must be a multiple of `step` \\(64\\), not 500: use 448 or 512"):
        ds.make_buckets(500)
    with pytest.raises(ValueError, match="min_side <= resolution <= max_side"):
        ds.make_buckets(512, min_side=640)


# -------------------------------------------------------------------------------------------------- load_example

def test_load_example_gives_exactly_the_size_and_centres_the_crop(tmp_path):
    path = save_image(tmp_path / "wide.png", 200, 100)
    image, (top, left) = ds.load_example(path, (64, 64))
    assert image.size == (64, 64) and (top, left) == (0, 32)  # resized to 128x64, 64 cut from the width
    image, (top, left) = ds.load_example(path, (96, 32))
    assert image.size == (96, 32) and (top, left) == (8, 0)   # resized to 96x48
    tiny = Image.new("RGB", (10, 30))
    assert ds.load_example(tiny, (64, 64))[0].size == (64, 64)  # upscaled to cover


def test_flip_mirrors_the_crop_and_reports_the_mirrored_offset(tmp_path):
    path = save_image(tmp_path / "wide.png", 200, 100, seed=7)
    plain, (top, left) = ds.load_example(path, (48, 48), crop="random", rng=random.Random(3))
    flipped, (f_top, f_left) = ds.load_example(path, (48, 48), crop="random", flip=True, rng=random.Random(3))
    assert np.array_equal(np.asarray(flipped), np.asarray(plain)[:, ::-1])
    assert f_top == top and f_left == 96 - 48 - left


def test_random_crop_varies_with_the_seed_and_is_reproducible(tmp_path):
    path = save_image(tmp_path / "big.png", 160, 120, seed=8)
    offsets = [ds.load_example(path, (48, 64), crop="random", rng=random.Random(s))[1] for s in range(10)]
    assert len(set(offsets)) > 3 and all(top == 0 and 0 <= left <= 85 - 48 for top, left in offsets)
    a = ds.load_example(path, (48, 64), crop="random", rng=random.Random(4))
    b = ds.load_example(path, (48, 64), crop="random", rng=random.Random(4))
    assert a[1] == b[1] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    with pytest.raises(ValueError, match="`crop` must be one of center, random, not 'top'"):
        ds.load_example(path, (48, 64), crop="top")


# ---------------------------------------------------------------------------------------- dataset and batches

@pytest.fixture
def training_folder(tmp_path):
    """2 wide, 3 square and 2 tall images (repeats 2 for the square ones): 11 examples in 3 buckets."""
    for i in range(2):
        save_image(tmp_path / "1_wide" / f"w{i}.png", 128, 64, seed=i)
    for i in range(3):
        save_image(tmp_path / "2_sks dog" / f"s{i}.png", 80, 80, seed=10 + i)
        (tmp_path / "2_sks dog" / f"s{i}.txt").write_text(f"sks dog, tag{i}, extra, more")
    for i in range(2):
        save_image(tmp_path / "1_tall" / f"t{i}.png", 64, 128, seed=20 + i)
    return tmp_path


def make_dataset(folder, **kwargs):
    settings = {"resolution": 64, "step": 16, "trigger": "sks dog", "shuffle_captions": True,
                "caption_dropout": 0.1, "crop": "random", "flip_p": 0.5, "seed": 1}
    return ds.TrainingDataset(ds.find_items(folder), **(settings | kwargs))


def test_examples_have_the_promised_keys_and_are_reproducible(training_folder):
    dataset = make_dataset(training_folder)
    assert len(dataset) == 2 + 3 * 2 + 2
    wide = [e.path.name for e in dataset.entries].index("w0.png")
    example = dataset[wide]
    assert set(example) == {"pixel_values", "caption", "original_size", "crop_top_left", "bucket", "path"}
    assert example["path"] == str(dataset.entries[wide].path)
    width, height = example["bucket"]
    assert tuple(example["pixel_values"].shape) == (3, height, width) and width > height  # the wide bucket
    assert example["original_size"] == (64, 128)  # (height, width)
    assert -1.0 <= float(example["pixel_values"].min()) < 0 < float(example["pixel_values"].max()) <= 1.0
    again = make_dataset(training_folder)
    for index in range(len(dataset)):
        first, second = dataset[index], again[index]
        assert first["caption"] == second["caption"] and first["crop_top_left"] == second["crop_top_left"]
        assert (first["pixel_values"] == second["pixel_values"]).all()
    captions = {dataset[i]["caption"] for i in range(len(dataset))}
    assert any(c.startswith("sks dog, tag") for c in captions)  # trigger first, the caption's own tags follow
    assert dataset[wide]["caption"] in ("sks dog, wide", "")  # uncaptioned: its folder's concept (or dropped)


def test_a_new_epoch_draws_new_augmentations(training_folder):
    dataset = make_dataset(training_folder, caption_dropout=0.0)
    square = [i for i in range(len(dataset)) if dataset.bucket_per_index[i] == (64, 64)]
    first = [(dataset[i]["caption"], dataset[i]["pixel_values"].sum().item()) for i in square]
    dataset.set_epoch(1)
    second = [(dataset[i]["caption"], dataset[i]["pixel_values"].sum().item()) for i in square]
    assert first != second


def test_bucket_batches_have_one_shape_and_a_seeded_order(training_folder):
    from torch.utils.data import DataLoader

    dataset = make_dataset(training_folder)
    sampler = ds.BucketBatchSampler(dataset, batch_size=2, seed=5)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=ds.collate_examples)
    batches = list(loader)
    assert len(batches) == len(sampler) == 1 + 3 + 1  # wide 2 -> 1, square 6 -> 3, tall 2 -> 1
    seen = []
    for batch in batches:
        width, height = batch["buckets"][0]
        assert set(batch["buckets"]) == {(width, height)}
        assert tuple(batch["pixel_values"].shape) == (2, 3, height, width) and len(batch["captions"]) == 2
    for indices in sampler.batches():
        seen += indices
    assert sorted(seen) == list(range(len(dataset)))  # every example exactly once an epoch

    order0 = sampler.batches()
    assert ds.BucketBatchSampler(dataset, batch_size=2, seed=5).batches() == order0  # same seed, same order
    sampler.set_epoch(1)
    assert dataset.epoch == 1 and sampler.batches() != order0  # a new epoch, a new order
    assert sampler.batches(epoch=0) == order0

    short = ds.BucketBatchSampler(dataset, batch_size=4, seed=5)
    assert sorted(len(b) for b in short.batches()) == [2, 2, 2, 4]
    dropping = ds.BucketBatchSampler(dataset, batch_size=4, seed=5, drop_last=True)
    assert [len(b) for b in dropping.batches()] == [4] and len(dropping) == 1


def test_several_processes_share_an_epoch_in_turn_and_take_equal_steps(training_folder):
    dataset = make_dataset(training_folder)
    whole = ds.BucketBatchSampler(dataset, batch_size=2, seed=5)          # 5 batches an epoch
    ranks = [ds.BucketBatchSampler(dataset, batch_size=2, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    every = whole.batches()
    assert [len(r) for r in ranks] == [3, 3] and [len(r.batches()) for r in ranks] == [3, 3]
    assert ranks[0].batches() == every[0::2] and ranks[1].batches() == every[1::2] + every[:1]  # padded round
    assert all(r.all_batches() == every for r in ranks)
    for r in ranks:
        r.set_epoch(1)
    whole.set_epoch(1)
    assert ranks[0].batches() == whole.batches()[0::2] != every[0::2]             # a new epoch, a new order
    assert set(sum(ranks[0].batches() + ranks[1].batches(), [])) == set(range(len(dataset)))  # all seen
    with pytest.raises(ValueError, match=r"`rank` must be an integer in \[0, num_replicas=2\), not 2"):
        ds.BucketBatchSampler(dataset, batch_size=2, num_replicas=2, rank=2)


def test_mixed_sizes_in_one_batch_are_refused(training_folder):
    dataset = make_dataset(training_folder)
    with pytest.raises(ValueError, match="A batch mixes image sizes.*BucketBatchSampler"):
        ds.collate_examples([dataset[0], dataset[len(dataset) - 1]])


def test_without_bucketing_everything_is_square(training_folder):
    dataset = make_dataset(training_folder, bucketing=False)
    assert set(dataset.bucket_per_index) == {(64, 64)}
    assert tuple(dataset[0]["pixel_values"].shape) == (3, 64, 64)


def test_the_module_imports_without_torch():
    code = "import sys, helpers.training.datasets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
