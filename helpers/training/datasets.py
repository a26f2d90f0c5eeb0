"""Training datasets in kohya's layout: images with `.txt` captions beside them, `N_name` folders for repeats.

    find_items      every image of a folder, its caption, its repeats and its concept (from `10_sks dog`)
    check_dataset   a report of every bad file, before any compute is spent
    prepare_folder  a dataset from a folder, a .zip (extracted safely) or a public Google Drive link
    build_caption   kohya's caption processing: trigger first, tag shuffle with kept tokens, caption dropout
    make_buckets, assign_bucket, group_by_bucket    aspect-ratio bucketing (kohya style: area <= resolution^2)
    load_example    resize to cover, crop to the exact size, flip (pure PIL: torchvision is not required)
    TrainingDataset, BucketBatchSampler, collate_examples   for a torch DataLoader of same-size batches

Every random choice is drawn from a `random.Random` seeded by (seed, epoch, index), so a resumed run sees exactly the
data an uninterrupted one would. torch is imported only where tensors are made: this module imports without it.
"""
import math
import random
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import captions, paths, storage
from .. import images as imaging

CROPS = ("center", "random")
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")                     # kohya: "10_sks dog" -> 10 repeats, "sks dog"
_DRIVE_FILE = re.compile(r"(?:/file/d/|[?&]id=)([\w-]{10,})")
_DRIVE_FOLDER = re.compile(r"/folders/([\w-]{10,})")
_SHOWN = 20                                                       # files listed per kind of problem in a report


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, not {value!r}.")


# ----------------------------------------------------------------------------------------------------------- items

@dataclass(frozen=True)
class Item:
    path: Path
    caption: str                # the first line of its .txt (beside it, or the fallback copy: read_caption), or ""
    repeats: int                # how often one epoch shows it (kohya's `N_` folder prefix)
    concept: str | None = None  # the class/instance words of its `N_name` folder (or the trigger), e.g. "sks dog"


def read_caption(image_path) -> str:
    """The caption of an image: the first non-empty line of the `.txt` beside it (kohya reads the first line), or of
    its copy in the local fallback (see captions.caption_source), or "". A caption file that is not UTF-8 (or UTF-16
    with a BOM) raises ValueError naming it and the fix, rather than train on mojibake."""
    return _caption_and_source(image_path)[0]


def _caption_and_source(image_path) -> tuple[str, bool]:
    """(read_caption's caption, whether it came from the local fallback copy)."""
    text, source = captions.read_caption_file(image_path)
    return (text.splitlines()[0].strip(), source != captions.caption_path(image_path)) if text else ("", False)


def _repeats_and_concept(folder: Path, path: Path, default_repeats: int) -> tuple[int, str | None]:
    parts = path.relative_to(folder).parts
    match = _REPEATS_FOLDER.match(parts[0]) if len(parts) > 1 else None
    if not match:  # directly in `folder`, or in a sub-folder without a count: the default
        return default_repeats, None
    repeats, concept = int(match.group(1)), match.group(2).strip()
    if repeats == 0:
        raise ValueError(f"Folder {parts[0]!r} asks for 0 repeats, so its images would never be shown. Rename it "
                         f"to e.g. '1_{concept}', or move those images out of {str(folder)!r}.")
    return repeats, concept or None


def _no_images(folder) -> ValueError:
    return ValueError(f"No images in {str(folder)!r} (looked for {', '.join(imaging.IMAGE_EXTENSIONS)}, sub-folders "
                      "too). Put the training images there, e.g. in a sub-folder named '10_sks dog' (10 repeats of "
                      "the concept 'sks dog'), or check that the path, the unzipped folder or the Drive link is right.")


def find_items(folder, trigger: str | None = None, default_repeats: int = 1) -> list[Item]:
    """Every image under `folder` with its caption ("" if it has no `.txt`), its repeats and its concept.

    kohya's layout: an image in a top-level sub-folder named `N_name` is repeated N times and its concept is `name`;
    an image directly in `folder`, or in a sub-folder without a count, gets `default_repeats` and the `trigger` as
    its concept (kohya skips such folders; here they are used). Raises ValueError when there is no image at all,
    when two images would share one caption file (`a.png`, `a.jpg`) or a caption is not UTF-8 (or UTF-16 with a
    BOM). Captions read from the local fallback (written there while Drive failed) are said in one printed line.
    """
    folder = paths.refuse_broad(paths.user_path(folder, "dataset"), "dataset")
    _check_int("default_repeats", default_repeats)
    trigger = trigger.strip() if trigger and trigger.strip() else None
    images = imaging.list_images(folder)
    if not images:
        raise _no_images(folder)
    captions.check_one_caption_per_image(images)
    items, bad, from_fallback = [], [], 0
    for path in images:
        repeats, concept = _repeats_and_concept(folder, path, default_repeats)
        try:
            caption, fell_back = _caption_and_source(path)
        except captions.CaptionEncodingError as e:
            bad.append(e)
            continue
        from_fallback += fell_back
        items.append(Item(path=path, caption=caption, repeats=repeats, concept=concept or trigger))
    if bad:
        more = (f" ({len(bad) - 1} more caption file(s) like it: check_dataset(), or `python -m helpers "
                "check-dataset FOLDER`, lists them all)" if len(bad) > 1 else "")
        raise captions.CaptionEncodingError(bad[0].path, bad[0].why, str(bad[0]) + more)
    if from_fallback:
        print(captions.fallback_notice(from_fallback))
    return items


# ----------------------------------------------------------------------------------------------------------- check

@dataclass
class Report:
    folder: Path
    resolution: int
    min_side: int
    images: list[Path] = field(default_factory=list)
    sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)      # readable image -> (width, height)
    unreadable: dict[Path, str] = field(default_factory=dict)             # image file -> why it cannot be read
    too_small: dict[Path, tuple[int, int]] = field(default_factory=dict)  # image -> (width, height), < min_side
    bad_captions: dict[Path, str] = field(default_factory=dict)           # caption file -> why it cannot be read
    same_stem: list[list[Path]] = field(default_factory=list)             # images that would share one .txt
    uncaptioned: list[Path] = field(default_factory=list)                 # warning: no (or an empty) .txt
    orphan_captions: list[Path] = field(default_factory=list)             # warning: a .txt with no image beside it
    fallback_captions: list[Path] = field(default_factory=list)           # warning: caption read from local fallback

    @property
    def ok(self) -> bool:
        """True when every image can be trained on with its own caption. Missing, orphan and fallback captions are
        warnings: they do not count."""
        return not self.unreadable and not self.too_small and not self.bad_captions and not self.same_stem

    def _name(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.folder))
        except ValueError:
            return str(path)

    def _section(self, title: str, rows: list[str]) -> list[str]:
        if not rows:
            return []
        more = [f"  ... and {len(rows) - _SHOWN} more"] if len(rows) > _SHOWN else []
        return [f"{title} ({len(rows)}):"] + [f"  {row}" for row in rows[:_SHOWN]] + more

    def __str__(self) -> str:
        verdict = ("ready to train" if self.ok else
                   "NOT READY: remove or replace the files listed under ERROR, then check again")
        lines = [(f"Dataset {str(self.folder)!r}: {len(self.images)} image(s), {len(self.sizes)} readable, "
                  f"{len(self.images) - len(self.uncaptioned)} captioned: {verdict}.")]
        lines += self._section("ERROR unreadable images (re-save them as PNG or JPEG, or delete them)",
                               [f"{self._name(p)}: {why}" for p, why in self.unreadable.items()])
        lines += self._section(f"ERROR images smaller than {self.min_side} px a side, too small for resolution "
                               f"{self.resolution} (use larger images, or delete them)",
                               [f"{self._name(p)}: {w}x{h} px" for p, (w, h) in self.too_small.items()])
        lines += self._section("ERROR captions that are not UTF-8 text, so they would train as garbled words (open "
                               "each and save it as UTF-8; see TROUBLESHOOTING.md#caption-encoding)",
                               [f"{self._name(p)}: {why}" for p, why in self.bad_captions.items()])
        lines += self._section("ERROR images that would share one caption file (one caption per image: rename one "
                               "image of each pair, and its caption; see TROUBLESHOOTING.md#same-stem-images)",
                               [" and ".join(self._name(p) for p in group) + " -> "
                                + captions.caption_path(group[0]).name for group in self.same_stem])
        lines += self._section("warning: images without a caption (they train on their folder's concept or the "
                               "trigger word alone; caption them with LLaVA in notebook 02, or caption_folder)",
                               [self._name(p) for p in self.uncaptioned])
        lines += self._section("warning: captions without an image (ignored; rename each to its image's name with "
                               ".txt, or delete it)", [self._name(p) for p in self.orphan_captions])
        lines += self._section(f"warning: captions read from the local fallback folder {storage.LOCAL_FALLBACK} "
                               "(written there while Drive failed; lost when the session ends: run "
                               "captions.restore_fallback_captions(folder) once Drive works; see "
                               "TROUBLESHOOTING.md#fallback-captions)", [self._name(p) for p in self.fallback_captions])
        return "\n".join(lines)


def check_dataset(folder, resolution: int, min_side: int | None = None, progress: bool = True) -> Report:
    """Open every image under `folder` and report, by file name, what would spoil a training run: unreadable files,
    images smaller than `min_side` px a side (default `resolution // 2`), captions that are not UTF-8 (or UTF-16
    with a BOM), images that would share one caption file and, as warnings, images without a caption, captions
    without an image and captions read from the local fallback. Bad files are reported, not raised; no image at all
    raises ValueError."""
    from tqdm.auto import tqdm

    folder = paths.refuse_broad(paths.user_path(folder, "dataset"), "dataset")
    _check_int("resolution", resolution)
    min_side = resolution // 2 if min_side is None else min_side
    _check_int("min_side", min_side)
    report = Report(folder=folder, resolution=resolution, min_side=min_side, images=imaging.list_images(folder))
    if not report.images:
        raise _no_images(folder)
    for path in tqdm(report.images, desc="checking images", disable=not progress):
        try:
            with imaging.open_image(path, min_side=1) as image:
                size = image.size
        except (ValueError, OSError) as e:
            report.unreadable[path] = str(e)
            continue
        report.sizes[path] = size
        if min(size) < min_side:
            report.too_small[path] = size
    report.same_stem = captions.same_stem_images(report.images)
    for path in report.images:
        try:
            caption, fell_back = _caption_and_source(path)
        except captions.CaptionEncodingError as e:
            report.bad_captions[e.path] = e.why
            continue
        if not caption:
            report.uncaptioned.append(path)
        elif fell_back:
            report.fallback_captions.append(path)
    captioned = {captions.caption_path(p) for p in report.images}
    report.orphan_captions = sorted(p for p in folder.rglob("*.txt") if p not in captioned and
                                    not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return report


# ------------------------------------------------------------------------------------------------- folders, zip, Drive

def _is_junk(name: str) -> bool:
    return name.replace("\\", "/").split("/")[0] == "__MACOSX"  # macOS resource forks, never images


def extract_zip(archive, dest) -> Path:
    """Extract the .zip `archive` into `dest` after checking every member: an absolute path or a `..` part
    (zip-slip: a file written outside `dest`) is refused, naming the member, before anything is written."""
    archive, dest = Path(archive), Path(dest)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not _is_junk(m.filename)]
            root = dest.resolve()
            for member in members:
                name = member.filename.replace("\\", "/")
                unsafe = (name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in name.split("/")
                          or not (root / name).resolve().is_relative_to(root))
                if unsafe:
                    raise ValueError(f"{str(archive)!r} holds the member {member.filename!r}, which would be written "
                                     f"outside {str(dest)!r} (an absolute path or '..': a zip-slip). Refusing to "
                                     "extract it: re-create the .zip from the dataset folder itself.")
            needed = sum(m.file_size for m in members)
            dest.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(dest).free
            if needed > free:
                raise ValueError(f"{str(archive)!r} unpacks to {needed / 1e9:.1f} GB but {str(dest)!r} has only "
                                 f"{free / 1e9:.1f} GB free: free some space, or extract it elsewhere (`dest`).")
            for member in members:
                zf.extract(member, dest)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{str(archive)!r} is not a readable .zip ({e}): download or create it again.") from None
    except RuntimeError as e:  # zipfile's word for an encrypted member
        raise ValueError(f"{str(archive)!r} cannot be extracted ({e}): zip it again without a password.") from None
    return dest


def _dataset_root(folder: Path) -> Path:
    """`folder`, or the single folder it holds when a zip or a Drive folder wraps the dataset in one (but not an
    `N_name` repeats folder: that one's name carries the repeats)."""
    while True:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".") and not _is_junk(p.name)]
        if len(entries) != 1 or not entries[0].is_dir() or _REPEATS_FOLDER.match(entries[0].name):
            return folder
        folder = entries[0]


def _download_drive(url: str, dest: Path) -> Path:
    folder_id, file_id = _DRIVE_FOLDER.search(url), _DRIVE_FILE.search(url)
    if "drive.google.com" not in url or not (folder_id or file_id):
        raise ValueError(f"{url!r} is not a Google Drive link: pass a local folder, a .zip, or a link like "
                         "https://drive.google.com/drive/folders/FOLDER_ID or .../file/d/FILE_ID/view (shared as "
                         "'anyone with the link').")
    import gdown

    advice = "share it as 'anyone with the link', or download it and pass its local path."
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if folder_id:
            got = gdown.download_folder(id=folder_id.group(1), output=str(dest), quiet=True)
        else:
            (dest / ".download").mkdir(exist_ok=True)  # hidden: list_images and check_dataset skip it
            got = gdown.download(id=file_id.group(1), output=str(dest / ".download") + "/", quiet=True)
    except (gdown.exceptions.DownloadError, OSError) as e:
        raise ValueError(f"Google Drive did not hand over {url!r} ({e}): {advice}") from None
    if not got:
        raise ValueError(f"Google Drive did not hand over {url!r}: {advice}")
    if folder_id:
        return dest
    got = Path(got)
    if not zipfile.is_zipfile(got):
        raise ValueError(f"{url!r} links to {got.name!r}, which is not a .zip: share the dataset folder itself, or "
                         "a .zip of it.")
    extract_zip(got, dest)
    got.unlink()  # extracted: the archive would only take space (on Drive, perhaps)
    return dest


def prepare_folder(source, dest=None) -> Path:
    """The dataset folder for `source`: a local folder (returned as is), a local .zip (extracted into `dest`), or a
    public Google Drive link to a folder or to a .zip (downloaded with gdown into `dest`, then extracted). `dest`
    defaults to the project's datasets/<name>. Where the archive wraps everything in one folder, that folder is
    returned. Check the result with check_dataset() before training."""
    path = paths.refuse_broad(paths.user_path(source, "dataset"), "dataset")
    text = str(source).strip().strip("\"'").strip()   # a link keeps its "//", which Path would fold
    if path.is_dir():
        return path
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{text!r} is a file but not a .zip: pass a folder of images, a .zip of one, or a "
                             "public Google Drive link.")
        dest = Path(dest) if dest is not None else storage.project_paths().datasets / path.stem
        return _dataset_root(extract_zip(path, dest))
    if text.startswith(("http://", "https://")):
        name = (_DRIVE_FOLDER.search(text) or _DRIVE_FILE.search(text))
        if dest is None:
            dest = storage.project_paths().datasets / (name.group(1) if name else "drive")
        dest = Path(dest)
        return _dataset_root(_download_drive(text, dest))
    raise FileNotFoundError(f"No dataset at {text!r}: pass a folder of images, a .zip of one, or a public Google Drive "
                            "link (and check that Drive is mounted).")


# -------------------------------------------------------------------------------------------------------- captions

def _holds_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def build_caption(caption: str, trigger: str | None = None, shuffle: bool = False, keep_tokens: int = 1,
                  dropout: float = 0.0, rng: random.Random | None = None) -> str:
    """The caption a training step sees, with kohya's semantics. Tags are the comma-separated parts of `caption`.

    - The trigger word goes first: a tag equal to it is moved to the front; where a tag already holds it as a word
      ("a photo of sks dog") nothing is added; else it is prepended. It then always stays first.
    - `shuffle`: the first `keep_tokens` tags (counted with the trigger, as kohya counts them when the trigger is
      written in the .txt) stay in front, the rest are shuffled.
    - `dropout`: with this probability the caption becomes "" entirely, the trigger included, as kohya's
      caption_dropout_rate does: those steps train the unconditional prediction that guidance relies on.
    `rng` (a seeded random.Random) is needed for `shuffle` or `dropout`; the dropout draw comes first.
    """
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"`dropout` is a probability between 0 and 1, not {dropout!r} (0.05-0.1 is usual).")
    _check_int("keep_tokens", keep_tokens, minimum=0)
    if (shuffle or dropout > 0) and rng is None:
        raise ValueError("`rng` is needed to shuffle or drop captions: pass random.Random(seed).")
    if dropout > 0 and rng.random() < dropout:
        return ""
    tags = [tag.strip() for tag in (caption or "").split(",")]
    tags = [tag for tag in tags if tag]
    trigger = (trigger or "").strip()
    keep = keep_tokens
    if trigger:
        tags = [tag for tag in tags if tag.lower() != trigger.lower()]
        if not any(_holds_word(tag, trigger) for tag in tags):
            tags.insert(0, trigger)
            keep = max(keep, 1)
    if shuffle and len(tags) > keep:
        rest = tags[keep:]
        rng.shuffle(rest)
        tags = tags[:keep] + rest
    return ", ".join(tags)


# --------------------------------------------------------------------------------------------------------- buckets

def make_buckets(resolution: int, min_side: int | None = None, max_side: int | None = None,
                 step: int = 64) -> list[tuple[int, int]]:
    """kohya's aspect-ratio buckets: (width, height) pairs, both multiples of `step` between `min_side` (default
    resolution // 2) and `max_side` (default 2 * resolution), each the largest with width * height <= resolution^2,
    plus the square (resolution, resolution). Sorted from tallest to widest."""
    _check_int("step", step)
    _check_int("resolution", resolution, minimum=step)
    min_side = max(step, resolution // 2 // step * step) if min_side is None else min_side
    max_side = 2 * resolution if max_side is None else max_side
    for name, value in (("resolution", resolution), ("min_side", min_side), ("max_side", max_side)):
        _check_int(name, value)
        if value % step:
            raise ValueError(f"`{name}` must be a multiple of `step` ({step}), not {value}: use "
                             f"{value // step * step or step} or {(value // step + 1) * step}.")
    if not min_side <= resolution <= max_side:
        raise ValueError(f"Buckets need min_side <= resolution <= max_side, not {min_side} <= {resolution} <= "
                         f"{max_side}.")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def assign_bucket(width: int, height: int, buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width:height (compared as log ratios, so 2:1 and 1:2 are equally
    far from 1:1); of equally close ones, the largest."""
    if width <= 0 or height <= 0:
        raise ValueError(f"An image size must be positive, not {width}x{height}.")
    if not buckets:
        raise ValueError("`buckets` is empty: make them with make_buckets(resolution).")
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def group_by_bucket(items_with_sizes, buckets) -> dict[tuple[int, int], list]:
    """{bucket: [item, ...]} from (item, (width, height)) pairs, items in their given order, buckets sorted."""
    groups: dict[tuple[int, int], list] = {}
    for item, (width, height) in items_with_sizes:
        groups.setdefault(assign_bucket(width, height, buckets), []).append(item)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0][0])))


# ---------------------------------------------------------------------------------------------------------- images

def load_example(source, size, crop: str = "center", flip: bool = False, rng: random.Random | None = None):
    """(image, (top, left)): `source` (an Item, a path or a PIL image) resized to just cover `size` = (width,
    height), keeping its aspect ratio, then cropped to exactly `size`; mirrored left-right if `flip`. (top, left) is
    where the crop starts in the resized image (after the flip, as diffusers' SDXL training script computes it):
    SDXL is conditioned on it. `crop="random"` draws the offsets from `rng`."""
    from PIL import Image, ImageOps

    if crop not in CROPS:
        raise ValueError(f"`crop` must be one of {', '.join(CROPS)}, not {crop!r}.")
    if crop == "random" and rng is None:
        raise ValueError("`crop='random'` needs `rng`: pass random.Random(seed).")
    width, height = size
    _check_int("size[0] (width)", width)
    _check_int("size[1] (height)", height)
    if isinstance(source, Image.Image):
        image = source
    else:
        image = imaging.open_image(source.path if isinstance(source, Item) else source, min_side=1)
    scale = max(width / image.width, height / image.height)
    resized_w, resized_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    if (resized_w, resized_h) != image.size:
        image = image.resize((resized_w, resized_h), Image.Resampling.LANCZOS)
    if crop == "center":
        top, left = (resized_h - height) // 2, (resized_w - width) // 2
    else:
        top, left = rng.randint(0, resized_h - height), rng.randint(0, resized_w - width)
    picture = image.crop((left, top, left + width, top + height))
    if flip:
        picture, left = ImageOps.mirror(picture), resized_w - width - left
    return picture, (top, left)


def image_size(path) -> tuple[int, int]:
    """(width, height) as open_image would give it (EXIF rotation applied), read from the header only."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"Cannot read image {str(path)!r} ({e}): run check_dataset() on the folder and fix what it "
                         "lists.") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# --------------------------------------------------------------------------------------------- dataset and sampler

class TrainingDataset:
    """A map-style torch dataset (DataLoader's protocol: `__len__`, `__getitem__`; it does not subclass
    torch.utils.data.Dataset, so this module imports without torch) over `items`, each repeated `item.repeats`
    times. Example i of an epoch is a dict:

        pixel_values   float tensor (3, height, width) in [-1, 1], the size of its bucket
        caption        build_caption(item.caption or item.concept, trigger, ...)
        original_size  (height, width) of the image file;  crop_top_left (top, left);  bucket (width, height)
        path           the image file (the key of cached latents)

    Its random draws (flip, crop, caption dropout and shuffle) come from random.Random seeded by (seed, epoch, i):
    the same seed, epoch and index always give the same example. Call set_epoch() (BucketBatchSampler.set_epoch
    does) before each epoch. `sizes` ({path: (width, height)}, e.g. check_dataset(...).sizes) saves reading headers.
    """

    def __init__(self, items, resolution: int, trigger: str | None = None, shuffle_captions: bool = False,
                 keep_tokens: int = 1, caption_dropout: float = 0.0, crop: str = "center", flip_p: float = 0.0,
                 bucketing: bool = True, step: int = 64, min_side: int | None = None, max_side: int | None = None,
                 seed: int = 0, sizes: dict | None = None):
        items = list(items)
        if not items:
            raise ValueError("`items` is empty: pass find_items(folder), and check the folder with check_dataset().")
        if crop not in CROPS:
            raise ValueError(f"`crop` must be one of {', '.join(CROPS)}, not {crop!r}.")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"`flip_p` is a probability between 0 and 1, not {flip_p!r} (0.5 flips half).")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"`caption_dropout` is a probability between 0 and 1, not {caption_dropout!r}.")
        _check_int("keep_tokens", keep_tokens, minimum=0)
        self.items, self.resolution, self.trigger, self.seed, self.epoch = items, resolution, trigger, seed, 0
        self.shuffle_captions, self.keep_tokens, self.caption_dropout = shuffle_captions, keep_tokens, caption_dropout
        self.crop, self.flip_p = crop, flip_p
        self.buckets = make_buckets(resolution, min_side, max_side, step) if bucketing else [(resolution, resolution)]
        sizes = dict(sizes or {})
        self.entries = [item for item in items for _ in range(item.repeats)]
        bucket_of_item = {}
        for item in items:
            size = sizes.get(item.path) or image_size(item.path)
            bucket_of_item[item.path] = assign_bucket(*size, self.buckets)
        self.bucket_per_index = [bucket_of_item[item.path] for item in self.entries]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        import numpy as np
        import torch

        if not 0 <= index < len(self.entries):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self.entries)} examples.")
        item, bucket = self.entries[index], self.bucket_per_index[index]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        image = imaging.open_image(item.path, min_side=1)
        flip = self.flip_p > 0 and rng.random() < self.flip_p
        picture, crop_top_left = load_example(image, bucket, crop=self.crop, flip=flip, rng=rng)
        caption = build_caption(item.caption or item.concept or "", self.trigger, shuffle=self.shuffle_captions,
                                keep_tokens=self.keep_tokens, dropout=self.caption_dropout, rng=rng)
        pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
        return {"pixel_values": pixels, "caption": caption, "original_size": (image.height, image.width),
                "crop_top_left": crop_top_left, "bucket": bucket, "path": str(item.path)}


class BucketBatchSampler:
    """Batches of dataset indices, each from one bucket only, so that a DataLoader(dataset, batch_sampler=this,
    collate_fn=collate_examples) yields same-size batches. Each epoch the indices within a bucket and then the order
    of the batches are shuffled by random.Random seeded by (seed, epoch): call set_epoch(epoch) before each epoch
    (it sets the dataset's epoch too; with DataLoader workers, before the loader's iterator is made).
    A bucket's last batch may be short; `drop_last` drops it.

    With several processes (`num_replicas`, one sampler per process with its `rank`), the epoch's batches are dealt
    out in turn: process r serves batches r, r + num_replicas, ...; where they do not divide evenly, the first ones
    are served again to fill the last round, so every process takes the same number of steps (as torch's
    DistributedSampler pads). The sharding is this sampler's own, so a resumed run skips exactly what it trained."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, drop_last: bool = False, shuffle: bool = True,
                 num_replicas: int = 1, rank: int = 0):
        _check_int("batch_size", batch_size)
        _check_int("num_replicas", num_replicas)
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must be an integer in [0, num_replicas={num_replicas}), not {rank!r}.")
        self.dataset, self.batch_size, self.seed, self.drop_last, self.shuffle = (dataset, batch_size, seed,
                                                                                 drop_last, shuffle)
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(dataset.bucket_per_index):
            self.by_bucket.setdefault(bucket, []).append(index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """The batches this process serves in `epoch` (default: the current one), in order (see the class note on
        several processes)."""
        every = self.all_batches(epoch)
        rounds = -(-len(every) // self.num_replicas)
        padded = (every * rounds)[:rounds * self.num_replicas] if every else []
        return padded[self.rank::self.num_replicas]

    def all_batches(self, epoch: int | None = None) -> list[list[int]]:
        """The batches of `epoch` (default: the current one) over all processes, in the order they are dealt."""
        rng = random.Random(f"{self.seed}:{self.epoch if epoch is None else epoch}:batches")
        batches = []
        for bucket in sorted(self.by_bucket):
            indices = list(self.by_bucket[bucket])
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        """The number of batches this process serves per epoch."""
        divide = (lambda n: n // self.batch_size) if self.drop_last else (lambda n: -(-n // self.batch_size))
        return -(-sum(divide(len(indices)) for indices in self.by_bucket.values()) // self.num_replicas)


def collate_examples(examples: list[dict]) -> dict:
    """A batch from TrainingDataset examples: pixel_values stacked to (batch, 3, height, width), and the lists
    captions, original_sizes, crop_top_lefts and buckets (SDXL's time ids come from the last three)."""
    import torch

    shapes = {tuple(e["pixel_values"].shape) for e in examples}
    if len(shapes) > 1:
        raise ValueError(f"A batch mixes image sizes {sorted(shapes)}: batch with BucketBatchSampler, or pass "
                         "bucketing=False to TrainingDataset.")
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "captions": [e["caption"] for e in examples],
            "original_sizes": [e["original_size"] for e in examples],
            "crop_top_lefts": [e["crop_top_left"] for e in examples],
            "buckets": [e["bucket"] for e in examples], "paths": [e["path"] for e in examples]}
