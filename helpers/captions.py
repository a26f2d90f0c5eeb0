"""Captions with LLaVA: one image, or a whole folder -> one kohya-style `.txt` beside each image.

A folder run is resumable: images that already have a caption are skipped (unless `overwrite`), each caption is
written atomically as soon as its batch is done, and a file that cannot be read is reported while the run goes on.
"""
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
                  max_chars: int | None = None) -> list[str]:
    """Captions of several PIL images in one batched generate (left padding), greedy."""
    import torch

    _check_style(style)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": STYLES[style]}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    processor.tokenizer.padding_side = "left"  # generation continues from the right end of every row
    inputs = processor(images=list(images), text=[prompt] * len(images), padding=True,
                       return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        output = model.generate(**inputs, do_sample=False,
                                max_new_tokens=smoke.cap("max_new_tokens", max_new_tokens or MAX_NEW_TOKENS[style]))
    texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [clean_caption(t, style, max_chars) for t in texts]


def caption_image(model, processor, image, style: str = "detailed", trigger: str | None = None,
                  max_new_tokens: int | None = None, max_chars: int | None = None) -> str:
    """The caption of one image (PIL image, path or URL), with the trigger word first if given."""
    caption = caption_batch(model, processor, [imaging.open_image(image)], style, max_new_tokens, max_chars)[0]
    return with_trigger(caption, trigger)


@dataclass
class CaptionReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)     # had a caption already
    failed: dict[Path, str] = field(default_factory=dict)  # image -> why

    def __str__(self) -> str:
        lines = [f"{len(self.written)} caption(s) written, {len(self.skipped)} skipped (already captioned), "
                 f"{len(self.failed)} image(s) could not be captioned."]
        lines += [f"  {path}: {why}" for path, why in self.failed.items()]
        return "\n".join(lines)


def caption_path(image_path: Path) -> Path:
    """Where the caption of `image_path` goes: beside it, same name, `.txt` (kohya's layout)."""
    return image_path.with_suffix(".txt")


def caption_folder(folder, model, processor, style: str = "detailed", trigger: str | None = None,
                   max_new_tokens: int | None = None, max_chars: int | None = None, batch_size: int = 4,
                   overwrite: bool = False, progress: bool = True) -> CaptionReport:
    """Caption every image under `folder` (sub-folders too, e.g. kohya's `10_name`) into `.txt` files beside them."""
    from tqdm.auto import tqdm

    _check_style(style)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, not {batch_size!r}.")
    report = CaptionReport()
    todo = []
    for path in imaging.list_images(folder):
        txt = caption_path(path)
        if not overwrite and txt.is_file() and txt.read_text(encoding="utf-8", errors="replace").strip():
            report.skipped.append(path)
        else:
            todo.append(path)
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
            captions = caption_batch(model, processor, [im for _, im in batch], style, max_new_tokens, max_chars)
        except (RuntimeError, ValueError) as e:  # e.g. out of memory on this batch: report, go on with the next
            for path, _ in batch:
                report.failed[path] = f"{type(e).__name__}: {e}"
            bar.update(len(batch))
            continue
        for (path, _), caption in zip(batch, captions):
            try:
                storage.atomic_write(caption_path(path), with_trigger(caption, trigger) + "\n")
                report.written.append(path)
            except OSError as e:
                report.failed[path] = f"caption not saved: {e}"
        bar.update(len(batch))
    bar.close()
    return report


def read_captions(folder) -> dict[Path, str]:
    """Every image under `folder` with its caption ("" where it has none)."""
    out = {}
    for path in imaging.list_images(folder):
        txt = caption_path(path)
        out[path] = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""
    return out


def save_caption(image_path, caption: str) -> Path:
    """Write (or replace) the caption of one image, atomically; used by the review panel."""
    return storage.atomic_write(caption_path(Path(image_path)), " ".join(caption.split()) + "\n")
