"""Captions with LLaVA: one image, or a whole folder -> one kohya-style `.txt` beside each image.

A folder run is resumable: images that already have a caption are skipped (unless `overwrite`), each caption is
written atomically as soon as its batch is done, and a file that cannot be read is reported while the run goes on.

Caption files are read as UTF-8 (with or without a BOM) or UTF-16 with a BOM (read_text_file); anything else is
named with the fix rather than read as mojibake, and a rewritten caption keeps its file's encoding. A caption that
was written to the local fallback while Drive failed is found there (caption_source) and can be put back beside its
image (restore_fallback_captions). Two images that would share one `.txt` (`a.png`, `a.jpg`) are refused.
"""
import codecs
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import images as imaging
from . import smoke, storage

STYLES = {
    "short": "Write a one-sentence caption for this image.",
    "detailed": ("Describe this image in detail in one paragraph: the main subject and its appearance, what it is "
                 "doing, the setting and background, the lighting, the colours and the style of the image."),
    "tags": ("List what this image shows as short comma-separated tags, most important first: subject, "
             "attributes, clothing, setting, lighting, style. Output only the tags."),
}
MAX_NEW_TOKENS = {"short": 60, "detailed": 220, "tags": 90}


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"Unknown caption style {style!r}; known: {', '.join(STYLES)}.")


def clean_caption(text: str, style: str, max_chars: int | None = None) -> str:
    """One line, as trainers expect. Tags: de-duplicated, lower case, ", "-separated. `max_chars` cuts at the last
    whole sentence (or tag) that fits."""
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"`max_chars` must be a positive number of characters or None, not {max_chars!r}.")
    if style == "tags":
        tags = []
        for tag in re.split(r"[,\n;]", text):
            tag = " ".join(re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", tag).split()).strip(" .").lower()
            if tag and tag not in tags:
                tags.append(tag)
        text = ", ".join(tags)
        if max_chars and len(text) > max_chars:
            text = text[:max_chars].rsplit(", ", 1)[0]
        return text
    text = " ".join(text.split())
    if max_chars and len(text) > max_chars:
        cut = text[:max_chars]
        sentence_end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
        text = cut[:sentence_end + 1] if sentence_end > 0 else cut.rsplit(" ", 1)[0]
    return text.strip()


def with_trigger(caption: str, trigger: str | None) -> str:
    """kohya's convention: the trigger word (or any prefix) first, then the caption. A caption is one line, so a
    trigger holding a line break is refused."""
    if trigger and any(c in trigger.strip() for c in "\r\n\x0b\x0c\x85\u2028\u2029"):
        raise ValueError(f"The trigger {trigger!r} holds a line break, which would cut the caption in two: use one "
                         "word or phrase on one line.")
    return f"{trigger.strip()}, {caption}" if trigger and trigger.strip() else caption


def caption_batch(model, processor, images: list, style: str = "detailed", max_new_tokens: int | None = None,
                  max_chars: int | None = None, image_budget: str = "high") -> list[str]:
    """Captions of several PIL images in one batched generate (left padding), greedy. image_budget: how many tokens
    each image takes (vlm.image_budget: "low", "medium", "high"; a detailed caption reads the whole grid best)."""
    import torch

    from .vlm import image_budget as budget

    _check_style(style)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": STYLES[style]}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    processor.tokenizer.padding_side = "left"  # generation continues from the right end of every row
    with budget(model, processor, image_budget):
        inputs = processor(images=list(images), text=[prompt] * len(images), padding=True,
                           return_tensors="pt").to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=smoke.cap(
                "max_new_tokens", max_new_tokens or MAX_NEW_TOKENS[style]))
    texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [clean_caption(t, style, max_chars) for t in texts]


def caption_image(model, processor, image, style: str = "detailed", trigger: str | None = None,
                  max_new_tokens: int | None = None, max_chars: int | None = None, image_budget: str = "high") -> str:
    """The caption of one image (PIL image, path or URL), with the trigger word first if given."""
    caption = caption_batch(model, processor, [imaging.open_image(image)], style, max_new_tokens, max_chars,
                            image_budget)[0]
    return with_trigger(caption, trigger)


@dataclass
class CaptionReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)     # had a caption already
    failed: dict[Path, str] = field(default_factory=dict)  # image -> why
    bad_captions: dict[Path, str] = field(default_factory=dict)  # caption file -> why it cannot be read

    def __str__(self) -> str:
        lines = [f"{len(self.written)} caption(s) written, {len(self.skipped)} skipped (already captioned), "
                 f"{len(self.failed)} image(s) could not be captioned."]
        lines += [f"  {path}: {why}" for path, why in self.failed.items()]
        lines += [f"  {why}" for why in self.bad_captions.values()]
        return "\n".join(lines)


def caption_path(image_path: Path) -> Path:
    """Where the caption of `image_path` goes: beside it, same name, `.txt` (kohya's layout)."""
    return Path(image_path).with_suffix(".txt")


# ------------------------------------------------------------------------------------------- caption files on disk

class CaptionEncodingError(ValueError):
    """A caption file that is neither UTF-8 nor UTF-16 with a BOM (Latin-1, Windows-1252, NUL bytes...): one line
    naming the file, why, and the fix. `path` and `why` hold the parts."""

    def __init__(self, path, why: str, message: str | None = None):
        self.path, self.why = Path(path), why
        super().__init__(message or f"Cannot read the caption {path}: {why}: {_FIX}")


_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_FIX = ("save it as UTF-8 (e.g. Notepad: Save as > Encoding: UTF-8), then run again. See "
        "TROUBLESHOOTING.md#caption-encoding")


def read_text_file(path) -> tuple[str, str]:
    """(text, encoding) of a caption file: UTF-8 with or without a BOM ("utf-8-sig" / "utf-8") or UTF-16 with a BOM
    ("utf-16-le" / "utf-16-be"), the BOM stripped. Anything else raises CaptionEncodingError (a ValueError, one
    line naming the file and the fix) instead of reading mojibake."""
    path = Path(path)
    data = path.read_bytes()
    encoding, body = "utf-8", data
    for bom, name in _BOMS:
        if data.startswith(bom):
            encoding, body = name, data[len(bom):]
            break
    if encoding.startswith("utf-8") and b"\x00" in body:
        raise CaptionEncodingError(path, "it holds NUL bytes (perhaps UTF-16 without its BOM, or not a text file)")
    try:
        text = body.decode("utf-8" if encoding == "utf-8-sig" else encoding)
    except UnicodeDecodeError as e:
        if encoding.startswith("utf-16"):
            why = f"it starts with a UTF-16 BOM but is not whole UTF-16 text ({e.reason} at byte {e.start})"
        else:
            why = (f"it is not UTF-8 (byte 0x{body[e.start]:02X} at position {e.start + len(data) - len(body)}; "
                   "perhaps Latin-1 or Windows-1252)")
        raise CaptionEncodingError(path, why) from None
    if "\x00" in text:
        raise CaptionEncodingError(path, "it holds NUL characters (not a text file?)")
    return text, encoding


def encode_text(text: str, encoding: str) -> bytes:
    """`text` as the bytes of a file in `encoding` (one of read_text_file's), its BOM included where it has one."""
    bom = {name: bom for bom, name in _BOMS}.get(encoding, b"")
    return bom + text.encode("utf-8" if encoding in ("utf-8", "utf-8-sig") else encoding)


def caption_source(image_path) -> Path | None:
    """The file the caption of `image_path` is read from: the `.txt` beside it, or its copy in the local fallback
    (storage.fallback_path: written there while Drive failed) where the one beside it is missing or empty, or older.
    None where neither exists. An unreadable one (see read_text_file) raises CaptionEncodingError."""
    beside = caption_path(Path(image_path))
    copy = storage.fallback_path(beside)
    found = [p for p in (beside, copy) if p.is_file()]
    if len(found) < 2:
        return found[0] if found else None
    beside_text, copy_text = (read_text_file(p)[0].strip() for p in found)
    if not copy_text:
        return beside
    if not beside_text or copy.stat().st_mtime_ns > beside.stat().st_mtime_ns:
        return copy
    return beside


def read_caption_file(image_path) -> tuple[str, Path | None]:
    """(the whole caption text, stripped, the file it came from) of `image_path` (see caption_source); ("", None)
    where it has none."""
    source = caption_source(image_path)
    return (read_text_file(source)[0].strip(), source) if source else ("", None)


def fallback_notice(count: int) -> str:
    """The line that says `count` captions were read from the local fallback folder, and what to do about it."""
    return (f"{count} caption(s) were read from the local fallback folder {storage.LOCAL_FALLBACK} (written there "
            "while Drive failed): they are lost when the session ends unless copied back beside their images; run "
            "captions.restore_fallback_captions(folder) once Drive works (see TROUBLESHOOTING.md#fallback-captions).")


def same_stem_images(images) -> list[list[Path]]:
    """Groups of images (sorted) that would share one caption file, e.g. `a.png` and `a.jpg` in one folder."""
    by_caption: dict[Path, list[Path]] = {}
    for image in images:
        by_caption.setdefault(caption_path(image), []).append(Path(image))
    return [sorted(group) for group in by_caption.values() if len(group) > 1]


def same_stem_error(groups) -> ValueError:
    pairs = "; ".join(" and ".join(str(p) for p in group) + f" (both {caption_path(group[0]).name})"
                      for group in groups[:5])
    more = f"; and {len(groups) - 5} more" if len(groups) > 5 else ""
    return ValueError(f"Images that would share one caption file: {pairs}{more}. One caption per image: rename one "
                      "image of each pair (e.g. a.jpg -> a_2.jpg, with its caption), then run again. See "
                      "TROUBLESHOOTING.md#same-stem-images")


def check_one_caption_per_image(images) -> None:
    """Raise same_stem_error where two of `images` would share a caption file."""
    groups = same_stem_images(images)
    if groups:
        raise same_stem_error(groups)


def write_caption(image_path, caption: str) -> Path:
    """Write the caption of `image_path` beside it, atomically, on one line, in the encoding of the caption it
    replaces (UTF-16 and a BOM are kept; a caption of unknown encoding is replaced by UTF-8, saying so). Where the
    write falls back to local disk, storage says where; where it lands beside the image, an older fallback copy is
    removed. Returns the path the file is at."""
    image_path = Path(image_path)
    target = caption_path(image_path)
    encoding = "utf-8"
    try:
        source = caption_source(image_path)
        if source is not None:
            encoding = read_text_file(source)[1]
    except CaptionEncodingError:
        print(f"The caption {target} was not UTF-8 (or UTF-16 with a BOM); it is replaced by one in UTF-8 (converted).")
    written = storage.atomic_write(target, encode_text(" ".join(caption.split()) + "\n", encoding))
    copy = storage.fallback_path(target)
    if written == target and copy.is_file():
        copy.unlink()
    return written


def restore_fallback_captions(folder) -> list[Path]:
    """Put every caption of `folder` that is read from the local fallback back beside its image (once Drive works
    again) and remove the fallback copy. Returns the captions written beside their images."""
    restored = []
    for path in imaging.list_images(folder):
        source = caption_source(path)
        if source is not None and source != caption_path(path):
            data = source.read_bytes()
            if storage.atomic_write(caption_path(path), data) == caption_path(path):
                source.unlink()
                restored.append(caption_path(path))
    return restored


def caption_folder(folder, model, processor, style: str = "detailed", trigger: str | None = None,
                   max_new_tokens: int | None = None, max_chars: int | None = None, batch_size: int = 4,
                   overwrite: bool = False, progress: bool = True, image_budget: str = "high") -> CaptionReport:
    """Caption every image under `folder` (sub-folders too, e.g. kohya's `10_name`) into `.txt` files beside them.
    image_budget: "low" (the base view and one tile: fewer tokens, faster), "medium" or "high" (see vlm)."""
    from tqdm.auto import tqdm

    from .vlm import _check_budget

    _check_style(style)
    _check_budget(image_budget)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, not {batch_size!r}.")
    with_trigger("", trigger)  # a trigger with a line break: refused before anything is captioned
    found = imaging.list_images(folder)
    check_one_caption_per_image(found)
    report = CaptionReport()
    todo, from_fallback = [], 0
    for path in found:
        try:
            text, source = read_caption_file(path)
        except CaptionEncodingError as e:  # a caption all the same: kept as it is (unless overwrite), and named
            text, source = "?", None
            if not overwrite:
                report.bad_captions[caption_path(path)] = str(e)
        if not overwrite and text:
            report.skipped.append(path)
            from_fallback += source is not None and source != caption_path(path)
        else:
            todo.append(path)
    if from_fallback:
        print(fallback_notice(from_fallback))
    bar = tqdm(total=len(todo), desc=f"captioning ({style})", unit="image", disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = []
        for path in todo[start:start + batch_size]:
            try:
                batch.append((path, imaging.open_image(path)))
            except (OSError, ValueError) as e:
                report.failed[path] = str(e)
                bar.update(1)
        if not batch:
            continue
        try:
            captions = caption_batch(model, processor, [im for _, im in batch], style, max_new_tokens, max_chars,
                                     image_budget)
        except (RuntimeError, ValueError) as e:  # e.g. out of memory on this batch: report, go on with the next
            for path, _ in batch:
                report.failed[path] = f"{type(e).__name__}: {e}"
            bar.update(len(batch))
            continue
        for (path, _), caption in zip(batch, captions):
            try:
                write_caption(path, with_trigger(caption, trigger))
                report.written.append(path)
            except OSError as e:
                report.failed[path] = f"caption not saved: {e}"
        bar.update(len(batch))
    bar.close()
    return report


def read_captions(folder) -> dict[Path, str]:
    """Every image under `folder` with its caption ("" where it has none), for the review panel. Captions in the
    local fallback are found (and said so); a caption that is not UTF-8, or two images sharing one caption file,
    raise ValueError (one line, with the fix) rather than show mojibake that saving would write back."""
    found = imaging.list_images(folder)
    check_one_caption_per_image(found)
    out, from_fallback = {}, 0
    for path in found:
        out[path], source = read_caption_file(path)
        from_fallback += source is not None and source != caption_path(path)
    if from_fallback:
        print(fallback_notice(from_fallback))
    return out


def save_caption(image_path, caption: str) -> Path:
    """Write (or replace) the caption of one image, atomically, on one line, in its file's encoding (see
    write_caption); used by the review panel."""
    return write_caption(image_path, caption)
