"""Instruction data from captions: each captioned image of a folder -> LLaVA-Instruct records of three kinds.

As LLaVA's own data was made, a language model that never sees the image is given the image's caption (the `.txt`
beside it), a system message and a few worked examples (assets/instruct/<kind>.json, written for this project), and
writes a conversation about the image, a detailed description, or a question that needs reasoning with its answer.
The default language model is the loaded LLaVA's own LLM answering text-only prompts (text_generator); any causal LM
from the hub or a folder works too (load_text_lm), and so does any function messages -> text.

Records are JSON lines in the LLaVA-Instruct form: `id`, `image` (relative to the folder), `kind` and
`conversations` ([{"from": "human" | "gpt", "value": ...}], exactly one `<image>`, in the first human turn).
to_messages turns one into the `messages` + `images` form of TRL and LLaMA-Factory. Every record is checked
(check_record) before it is written; a generation that does not parse is tried again with another seed, then
reported, never written. Each record is appended and flushed the moment it is made, so a kill loses no finished
record; a rerun makes only what is missing (overwrite=True starts again, keeping the old file as .bak).
"""
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from . import captions, smoke, storage
from . import images as imaging

KINDS = ("conversation", "detail", "reasoning")
IMAGE = "<image>"
PROMPTS_DIR = storage.ASSETS / "instruct"
DEFAULT_NAME = "instruct.jsonl"
RETRIES = 3                     # more tries of a generation that does not parse, each with another seed
MAX_NEW_TOKENS = {"conversation": 400, "detail": 250, "reasoning": 300}
_QA = re.compile(r"^\W*(question|answer)(?:\s*\d+)?\s*:\s*\**\s*(.*)$", re.IGNORECASE)   # "**Question 1:** ..."


def prompts(kind: str) -> dict:
    """The system message, worked examples (and for "detail" the questions) of `kind`, from assets/instruct."""
    if kind not in KINDS:
        raise ValueError(f"Unknown instruction kind {kind!r}; known: {', '.join(KINDS)}.")
    return json.loads((PROMPTS_DIR / f"{kind}.json").read_text(encoding="utf-8"))


def parse_kinds(kinds) -> tuple[str, ...]:
    """`kinds` ("conversation,detail" or a list) checked: known, not empty, no repeats."""
    found = [k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds) if k.strip()]
    unknown = [k for k in found if k not in KINDS]
    if unknown or not found:
        raise ValueError(f"`kinds` must name some of {', '.join(KINDS)}, not {kinds!r}.")
    return tuple(dict.fromkeys(found))


def build_messages(kind: str, caption: str) -> list[dict]:
    """The text-only chat that asks a language model for one record of `kind` about an image with `caption`."""
    spec = prompts(kind)
    messages = [{"role": "system", "content": spec["system"]}]
    for example in spec["examples"]:
        messages += [{"role": "user", "content": example["caption"]},
                     {"role": "assistant", "content": example["answer"]}]
    return messages + [{"role": "user", "content": caption.strip()}]


def parse_answer(kind: str, text: str) -> list[tuple[str | None, str]]:
    """The (question, answer) pairs in a language model's text: "Question: ... / Answer: ..." lines for
    conversation and reasoning (text before the first question is ignored), the whole text as one answer (question
    None) for detail. A text that does not parse raises ValueError saying why."""
    if IMAGE in text:
        raise ValueError(f"the text holds {IMAGE!r}, which only the first question may hold")
    if kind == "detail":
        text = re.sub(r"^\W*description\s*:\s*", "", text.strip(), flags=re.IGNORECASE).strip()
        if not re.search(r"\w", text):
            raise ValueError("the description is empty")
        return [(None, text)]
    pairs, role, lines = [], None, []

    def close():
        value = " ".join(" ".join(lines).split())
        if not value:
            raise ValueError(f"an empty {role}")
        if role == "question":
            pairs.append([value, None])
        else:
            pairs[-1][1] = value

    for line in text.splitlines():
        match = _QA.match(line.strip())
        if match:
            if role is not None:
                close()
            new = match.group(1).lower()
            if new == role or (role is None and new == "answer"):
                raise ValueError(f"two {new}s in a row" if role else "an answer before any question")
            role, lines = new, [match.group(2)]
        elif role is not None:
            lines.append(line.strip())
    if role is None:
        raise ValueError("no 'Question:' line")
    close()
    if pairs[-1][1] is None:
        raise ValueError("the last question has no answer")
    return [tuple(p) for p in pairs]


def make_record(image: str, kind: str, index: int, pairs) -> dict:
    """A LLaVA-Instruct record of `image` (its path relative to the folder, with / separators). A detail record's
    question (None in `pairs`) is one of the kind's questions, the same one for the same image and index."""
    turns = []
    for i, (question, answer) in enumerate(pairs):
        if question is None:
            questions = prompts(kind)["questions"]
            question = questions[zlib.crc32(f"{image}:{index}".encode()) % len(questions)]
        turns += [{"from": "human", "value": f"{IMAGE}\n{question}" if i == 0 else question},
                  {"from": "gpt", "value": answer}]
    return {"id": f"{image}:{kind}:{index}", "image": image, "kind": kind, "conversations": turns}


def check_record(record) -> None:
    """Raise ValueError saying what is wrong with `record`: fields, turns that alternate human/gpt (human first,
    gpt last), no empty turn, exactly one <image>, at the start or end of the first human turn."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, not {type(record).__name__}")
    for key in ("id", "image"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"`{key}` must be a non-empty string, not {record.get(key)!r}")
    if record.get("kind") not in KINDS:
        raise ValueError(f"`kind` must be one of {', '.join(KINDS)}, not {record.get('kind')!r}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
        raise ValueError("`conversations` must be a list of human/gpt pairs")
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected:
            raise ValueError(f"turn {i + 1} must be from {expected!r} (turns alternate, human first)")
        value = turn.get("value")
        if not isinstance(value, str) or not value.replace(IMAGE, "").strip():
            raise ValueError(f"turn {i + 1} is empty")
        if value.count(IMAGE) != (i == 0):
            raise ValueError(f"turn {i + 1} holds {value.count(IMAGE)} {IMAGE}: exactly one, in the first turn")
    first = turns[0]["value"].strip()
    if not (first.startswith(IMAGE) or first.endswith(IMAGE)):
        raise ValueError(f"{IMAGE} must start or end the first turn")


def read_records(path) -> list[dict]:
    """The records of a jsonl file, each checked. A line that is not a valid record raises ValueError naming the
    file and line; the file is not changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            check_record(record)
        except ValueError as e:   # json.JSONDecodeError is one
            why = f"not JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
            good = sum(1 for other in lines if other.strip()) - 1
            raise ValueError(f"{path} line {number} is not a valid record: {why}. Fix or delete that line, then run "
                             f"again; the file is left as it is (its other {good} line(s) are kept).") from None
        records.append(record)
    return records


def _repair_cut_line(path: Path) -> None:
    """A run killed while writing a record leaves its last line cut short (no newline at the end): remove that line,
    saying so (its record is made again). A last line that is whole but lacks its newline gets one."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    head, _, last = data.rpartition(b"\n")
    try:
        check_record(json.loads(last.decode("utf-8")))
    except ValueError:
        with open(path, "r+b") as f:
            f.truncate(len(head) + 1 if head else 0)
        print(f"The last line of {path} was cut short (a run stopped while writing it): removed; its record is made "
              "again.")
        return
    with open(path, "ab") as f:
        f.write(b"\n")


def save_records(path, records) -> Path:
    """Write `records` to `path` as JSON lines, atomically, each checked first (nothing is written if one fails);
    used by the review panel."""
    for i, record in enumerate(records, 1):
        try:
            check_record(record)
        except ValueError as e:
            raise ValueError(f"Record {i} ({record.get('id', '?') if isinstance(record, dict) else '?'}): {e}. "
                             "Nothing was saved.") from None
    return storage.atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def to_messages(record: dict, content: str = "parts", image_root=None) -> dict:
    """A record in the `messages` + `images` form. content="parts": TRL's (and transformers' chat templates'),
    each message's content a list of {"type": "image"} / {"type": "text", "text": ...}; content="text":
    LLaMA-Factory's, each content one string with <image> where the image goes. `image_root`: a folder the image
    path is joined to (default: kept relative)."""
    if content not in ("parts", "text"):
        raise ValueError(f"`content` must be 'parts' (TRL) or 'text' (LLaMA-Factory), not {content!r}.")
    check_record(record)
    messages = []
    for turn in record["conversations"]:
        role = "user" if turn["from"] == "human" else "assistant"
        value = turn["value"]
        if content == "text":
            messages.append({"role": role, "content": value})
            continue
        text = value.replace(IMAGE, "").strip()
        parts = [{"type": "text", "text": text}]
        if IMAGE in value:
            parts = [{"type": "image"}, *parts] if value.strip().startswith(IMAGE) else [*parts, {"type": "image"}]
        messages.append({"role": role, "content": parts})
    image = str(Path(image_root) / record["image"]) if image_root else record["image"]
    return {"messages": messages, "images": [image]}


def convert_file(source, target, content: str = "parts", image_root=None) -> Path:
    """The records of `source` (jsonl) in the messages + images form (see to_messages), as jsonl in `target`."""
    rows = [to_messages(r, content, image_root) for r in read_records(source)]
    return storage.atomic_write(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------------ language models

class TextGenerator:
    """A language model as a function messages -> text: the chat template of its tokenizer (or LLaVA's processor,
    with no image), then sampling. Its random draws come from torch's global generator (seeded by the caller)."""

    def __init__(self, model, processor, max_new_tokens: int = 400, temperature: float = 0.7, top_p: float = 0.9):
        self.model, self.processor = model, processor
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.parts = hasattr(processor, "image_processor")   # a processor's template reads content parts
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if not getattr(processor, "chat_template", None):
            name = getattr(model.config, "_name_or_path", "") or type(model).__name__
            raise ValueError(f"The tokenizer of {name!r} has no chat template, so instructions cannot be put to it: "
                             "use a chat (instruct) model, or set processor.chat_template to its chat format.")

    def prompt(self, messages: list[dict]) -> str:
        """The prompt text of `messages` (string contents), the generation prompt appended. A template that refuses
        a system message (some raise) gets it at the start of the first user message instead."""
        from jinja2.exceptions import TemplateError

        def render(msgs):
            if self.parts:
                msgs = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in msgs]
            return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

        try:
            return render(messages)
        except TemplateError:
            if messages[0]["role"] != "system":
                raise
            system, first, *rest = messages
            return render([{"role": first["role"], "content": system["content"] + "\n\n" + first["content"]}, *rest])

    def __call__(self, messages: list[dict], max_new_tokens: int | None = None) -> str:
        import torch

        prompt = self.prompt(messages)
        if self.parts:
            inputs = self.processor(text=prompt, return_tensors="pt")
        else:   # a template that writes the BOS itself must not get a second one
            bos = self.tokenizer.bos_token
            inputs = self.tokenizer(prompt, return_tensors="pt",
                                    add_special_tokens=not (bos and prompt.startswith(bos)))
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        kwargs = {"max_new_tokens": smoke.cap("max_new_tokens", max_new_tokens or self.max_new_tokens)}
        kwargs.update({"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
                      if self.temperature > 0 else {"do_sample": False})
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def text_generator(model, processor, **settings) -> TextGenerator:
    """The loaded LLaVA (or any causal LM with its tokenizer) as a messages -> text function, text only."""
    return TextGenerator(model, processor, **settings)


def load_text_lm(name: str, **settings) -> TextGenerator:
    """A language model by catalogue name, hub id or folder, as a TextGenerator. A LLaVA name loads LLaVA
    (load_llava) and uses its LLM; anything else loads with AutoModelForCausalLM (on a GPU in its runtime dtype)."""
    from . import loading, registry, runtime

    if registry.resolve(name, task="vlm").family == "llava_next":
        return TextGenerator(*loading.load_llava(name), **settings)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    profile = runtime.detect_profile()
    kwargs = {"dtype": runtime.pick_dtype(profile), "use_safetensors": True}
    if profile.device == "cuda":
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs).eval()
    return TextGenerator(model, AutoTokenizer.from_pretrained(name), **settings)


# --------------------------------------------------------------------------------------------------- a folder run

@dataclass
class InstructReport:
    path: Path
    written: int = 0
    skipped: int = 0                                       # records there already
    no_caption: list = field(default_factory=list)         # images without a caption (.txt)
    failed: dict = field(default_factory=dict)             # image (or image + kind) -> why
    retried: int = 0                                       # generations that did not parse and were tried again

    def __str__(self) -> str:
        lines = [f"{self.written} record(s) written to {self.path}, {self.skipped} there already, "
                 f"{self.retried} generation(s) tried again, {len(self.failed)} failed."]
        if self.no_caption:
            lines.append(f"{len(self.no_caption)} image(s) have no caption (.txt beside them), so no records: "
                         "caption them (notebook 02, or h.caption_folder) and run again: "
                         + ", ".join(p.name for p in self.no_caption[:5]) + (" ..." if len(self.no_caption) > 5
                                                                              else ""))
        lines += [f"  {what}: {why}" for what, why in self.failed.items()]
        return "\n".join(lines)


def _seed(seed: int, image: str, kind: str, index: int, attempt: int) -> int:
    return zlib.crc32(f"{seed}:{image}:{kind}:{index}:{attempt}".encode())


def generate_instructions(folder, lm, out=None, kinds=KINDS, per_image: int = 1, retries: int = RETRIES,
                          overwrite: bool = False, seed: int = 0, progress: bool = True) -> InstructReport:
    """For every captioned image under `folder`, `per_image` records of each of `kinds`, made by `lm` (a function
    messages -> text: text_generator, load_text_lm, or your own) and appended to `out` (default
    folder/instruct.jsonl). Records there already are kept and not made again; overwrite=True moves the file to
    .bak and makes all anew. Images without a caption, or with an unreadable one, are reported, not fatal."""
    from tqdm.auto import tqdm

    kinds = parse_kinds(kinds)
    if isinstance(per_image, bool) or not isinstance(per_image, int) or per_image < 1:
        raise ValueError(f"`per_image` must be a positive integer, not {per_image!r}.")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"`retries` must be 0 or a positive integer, not {retries!r}.")
    folder = Path(folder)
    found = imaging.list_images(folder)
    if not found:
        raise ValueError(f"{str(folder)!r} holds no images (.png, .jpg, .webp): put the captioned images there, or "
                         "pass the folder that holds them.")
    captions.check_one_caption_per_image(found)
    out = Path(out) if out else folder / DEFAULT_NAME
    if overwrite and out.is_file():
        backup = out.with_name(out.name + ".bak")
        os.replace(out, backup)
        print(f"overwrite: the old records are kept in {backup}; making all anew in {out}.")
    have: dict[tuple[str, str], int] = {}
    if out.is_file():
        _repair_cut_line(out)
        for record in read_records(out):
            have[record["image"], record["kind"]] = have.get((record["image"], record["kind"]), 0) + 1
    report = InstructReport(path=out)
    budgets = {k: smoke.cap("max_new_tokens", MAX_NEW_TOKENS[k]) for k in kinds}   # said once, not per record
    todo = []
    for path in found:
        image = path.relative_to(folder).as_posix()
        missing = {k: per_image - have.get((image, k), 0) for k in kinds}
        report.skipped += sum(min(have.get((image, k), 0), per_image) for k in kinds)
        if not any(n > 0 for n in missing.values()):
            continue
        try:
            caption, _ = captions.read_caption_file(path)
        except captions.CaptionEncodingError as e:
            report.failed[image] = str(e)
            continue
        if not caption:
            report.no_caption.append(path)
            continue
        todo.append((image, caption, missing))
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(n for *_, m in todo for n in m.values() if n > 0), desc="instruction data",
               unit="record", disable=not progress)
    with open(out, "a", encoding="utf-8") as f:
        for image, caption, missing in todo:
            for kind in kinds:
                for index in range(per_image - missing[kind], per_image):
                    record = _one_record(lm, image, caption, kind, index, retries, seed, report, budgets[kind])
                    bar.update(1)
                    if record is None:
                        continue
                    try:
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
                        f.flush()
                        os.fsync(f.fileno())   # on disk before the next one is made: a kill loses none
                    except Exception as e:   # a full disk or a gone Drive: the records before are whole, and a
                        if not storage.is_write_failure(e):   # rerun drops a cut last line and goes on
                            raise
                        raise storage.cannot_write(f"instruction record {report.written + 1}", out, e) from e
                    report.written += 1
    bar.close()
    return report


def _one_record(lm, image: str, caption: str, kind: str, index: int, retries: int, seed: int,
                report: InstructReport, max_new_tokens: int) -> dict | None:
    """One checked record, or None (and the reason in `report`) after 1 + `retries` tries."""
    import torch

    messages = build_messages(kind, caption)
    why = ""
    for attempt in range(retries + 1):
        torch.manual_seed(_seed(seed, image, kind, index, attempt))
        try:
            text = lm(messages) if not isinstance(lm, TextGenerator) else lm(messages, max_new_tokens)
            record = make_record(image, kind, index, parse_answer(kind, text))
            check_record(record)
            return record
        except ValueError as e:
            why = str(e)
            if attempt < retries:
                report.retried += 1
    report.failed[f"{image} ({kind} {index})"] = f"no valid {kind} after {retries + 1} tries (last: {why})"
    return None


def records_of(records, image: str) -> list[dict]:
    return [r for r in records if r["image"] == image]


# ---------------------------------------------------------------------------------------------- the review panel

def review_panel(path, folder=None, thumbnail: int = 256):
    """An ipywidgets panel: pick an image, see it with its records, edit any turn, Save (the edited records are
    checked, then the file is rewritten atomically). `folder`: where the images are (default: the file's folder).
    The panel's parts are attributes for headless use: .image (Dropdown), .boxes (Textareas of the shown records,
    one per turn), .save_button, .status."""
    import html
    import io

    import ipywidgets as w

    path = Path(path)
    folder = Path(folder) if folder else path.parent
    records = read_records(path)
    images = list(dict.fromkeys(r["image"] for r in records))
    picture = w.Image(format="png", layout=w.Layout(width=f"{thumbnail}px"))
    editors = w.VBox()
    panel = w.VBox()
    panel.image = w.Dropdown(options=images, description="Image")
    panel.boxes, panel.shown = [], []
    panel.save_button = w.Button(description="Save records", button_style="primary")
    panel.status = w.HTML()

    def show(_=None):
        panel.shown = records_of(records, panel.image.value) if panel.image.value else []
        panel.boxes, rows = [], []
        for record in panel.shown:
            rows.append(w.HTML(f"<b>{html.escape(record['kind'])}</b> <code>{html.escape(record['id'])}</code>"))
            for turn in record["conversations"]:
                box = w.Textarea(value=turn["value"], description="You" if turn["from"] == "human" else "LLaVA",
                                 layout=w.Layout(width="100%", height="70px"))
                panel.boxes.append(box)
                rows.append(box)
        editors.children = rows
        try:
            image = imaging.open_image(folder / panel.image.value)
            image.thumbnail((thumbnail, thumbnail))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            picture.value = buffer.getvalue()
        except (OSError, ValueError, TypeError):
            picture.value = b""

    def save(_=None):
        boxes = iter(panel.boxes)
        edited = {id(r): {**r, "conversations": [{**t, "value": next(boxes).value} for t in r["conversations"]]}
                  for r in panel.shown}
        new = [edited.get(id(r), r) for r in records]
        try:
            save_records(path, new)
        except (ValueError, OSError) as e:
            panel.status.value = f"<p style='color:#b00'>{html.escape(str(e))}</p>"
            return
        records[:] = new
        show()
        panel.status.value = f"<p>Saved {len(records)} record(s) to {html.escape(str(path))}.</p>"

    panel.image.observe(show, names="value")
    panel.save_button.on_click(save)
    panel.children = [panel.image, w.HBox([picture, editors]), panel.save_button, panel.status]
    show()
    return panel


# ------------------------------------------------------------------------------------------------------------ CLI

def instruct_main(argv=None) -> int:
    """`python -m helpers instruct FOLDER [--kinds conversation,detail,reasoning] [--per-image N] [--out FILE]
    [--lm NAME] [--retries N] [--overwrite] [--seed N]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m helpers instruct", description=(
        "Write LLaVA-Instruct records (conversation, detail, reasoning) for every captioned image of FOLDER."))
    parser.add_argument("folder")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    parser.add_argument("--per-image", type=int, default=1, help="records of each kind per image")
    parser.add_argument("--out", default=None, help=f"the jsonl file (default: FOLDER/{DEFAULT_NAME})")
    parser.add_argument("--lm", default="llava-1.6-mistral-7b",
                        help="the language model: a LLaVA name (its own LLM), a hub id or a folder")
    parser.add_argument("--retries", type=int, default=RETRIES)
    parser.add_argument("--overwrite", action="store_true", help="make all records anew (the old file -> .bak)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    kinds = parse_kinds(args.kinds)   # before a model is loaded
    if not imaging.list_images(args.folder):
        raise ValueError(f"{args.folder!r} holds no images (.png, .jpg, .webp): pass the folder of captioned images.")
    report = generate_instructions(args.folder, load_text_lm(args.lm), out=args.out, kinds=kinds,
                                   per_image=args.per_image, retries=args.retries, overwrite=args.overwrite,
                                   seed=args.seed)
    print(report)
    return 0 if not report.failed else 1
