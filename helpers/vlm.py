"""LLaVA conversations: one question about an image, or a chat over several turns and images.

A ChatSession keeps the turns (text and images) and rebuilds the whole prompt each turn with the checkpoint's own chat
template, so a follow-up question still sees the images of earlier turns. It streams answers, undoes and resets
turns, counts what each image costs in tokens, refuses (or trims) a conversation that would overflow the model's
context before the model sees it, and exports its transcript as Markdown and JSON.

LLaVA 1.6 shows the model an image as a base view plus tiles of its anyres grid: up to ~2,900 tokens for a large
square photo. An image budget caps that grid (image_budget): "low" is the base view and one tile (~1,176 tokens at
336 px), "medium" at most two tiles, "high" the checkpoint's whole grid; "auto" is "high", stepping down when a
conversation would overflow the context. Fewer image tokens: a faster first token and a smaller KV cache.
"""
import contextlib
import io
import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import images as imaging
from . import smoke, storage

TRANSCRIPT_FORMAT = "llava-sd-notebooks chat v1"
IMAGE_BUDGETS = {"low": 1, "medium": 2, "high": None, "auto": None}   # budget -> most tiles of the anyres grid


def _check_budget(budget: str) -> None:
    if budget not in IMAGE_BUDGETS:
        raise ValueError(f"`image_budget` must be one of {', '.join(map(repr, IMAGE_BUDGETS))}, not {budget!r}: "
                         "'low' shows the model the base view and one tile of each image (fewest tokens), 'high' "
                         "the whole anyres grid.")


@contextlib.contextmanager
def image_budget(model, processor, budget: str = "auto"):
    """Within this block, the processor and the model tile images into at most the budget's grid (IMAGE_BUDGETS):
    the grid points of more tiles are left out of both, which must agree (else transformers raises "Image features
    and image tokens do not match"). "high" and "auto" change nothing."""
    _check_budget(budget)
    tiles = IMAGE_BUDGETS[budget]
    image_processor = getattr(processor, "image_processor", None)
    grid = getattr(model.config, "image_grid_pinpoints", None)
    if tiles is None or not grid or image_processor is None:
        yield
        return
    size = model.config.vision_config.image_size
    kept = [list(p) for p in grid if (p[0] // size) * (p[1] // size) <= tiles] or [[size, size]]
    if [size, size] not in kept and tiles == 1:
        kept = [[size, size]]
    saved = (model.config.image_grid_pinpoints, image_processor.image_grid_pinpoints)
    model.config.image_grid_pinpoints = image_processor.image_grid_pinpoints = kept
    try:
        yield
    finally:
        model.config.image_grid_pinpoints, image_processor.image_grid_pinpoints = saved


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0        # 0: greedy (the same answer every time); above 0: sampling
    top_p: float = 0.9              # nucleus sampling, used when temperature > 0
    repetition_penalty: float = 1.0
    seed: int | None = None         # for reproducible sampling

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be a positive integer, not {self.max_new_tokens!r}.")
        if self.temperature < 0:
            raise ValueError(f"`temperature` must be 0 (greedy) or more, not {self.temperature!r}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], not {self.top_p!r}.")
        if self.repetition_penalty <= 0:
            raise ValueError(f"`repetition_penalty` must be above 0, not {self.repetition_penalty!r}.")

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": smoke.cap("max_new_tokens", self.max_new_tokens),
                  "repetition_penalty": self.repetition_penalty}
        if self.temperature == 0:
            return {**kwargs, "do_sample": False}
        return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class Turn:
    role: str                                   # "user" or "assistant"
    text: str
    images: list = field(default_factory=list)  # PIL images (user turns only)


class _StopFlag:
    """A stopping criterion that ends generation when set: a stream closed early does not leave generate running."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        return self.event.is_set()


class ChatSession:
    def __init__(self, model, processor, system_prompt: str | None = None,
                 settings: GenerationSettings | None = None, on_overflow: str = "error", image_budget: str = "auto"):
        """on_overflow: "error" (say so and change nothing) or "drop_oldest" (drop the oldest turns, and say so)
        when a turn would not fit the model's context. image_budget: "low", "medium", "high" or "auto" (see the
        module's docstring): how many tokens each image takes."""
        if on_overflow not in ("error", "drop_oldest"):
            raise ValueError(f"`on_overflow` must be 'error' or 'drop_oldest', not {on_overflow!r}.")
        _check_budget(image_budget)
        self.image_budget = image_budget
        self.model, self.processor = model, processor
        self.system_prompt = system_prompt
        self.settings = settings or GenerationSettings()
        self.on_overflow = on_overflow
        self.turns: list[Turn] = []
        self._image_tokens: dict[tuple, tuple] = {}   # (id(image), budget) -> (image, tokens); the image is kept
        self._budget = image_budget if image_budget != "auto" else "high"   # what the last turn was sent with

    # --- what the model sees ---------------------------------------------------------------------------------------

    @property
    def context_limit(self) -> int:
        config = self.model.config
        return getattr(getattr(config, "text_config", config), "max_position_embeddings")

    @property
    def images(self) -> list:
        return [im for turn in self.turns for im in turn.images]

    def messages(self, turns=None) -> list[dict]:
        """The turns in the chat-template format of transformers."""
        out = []
        if self.system_prompt:
            out.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        for turn in self.turns if turns is None else turns:
            content = [{"type": "image"} for _ in turn.images] + [{"type": "text", "text": turn.text}]
            out.append({"role": turn.role, "content": content})
        return out

    def inputs(self, turns=None, budget: str | None = None):
        """Model inputs for `turns` (default: the session's), with the generation prompt appended, the images at
        `budget` (default: the session's)."""
        turns = self.turns if turns is None else turns
        prompt = self.processor.apply_chat_template(self.messages(turns), add_generation_prompt=True)
        images = [im for turn in turns for im in turn.images]
        with image_budget(self.model, self.processor, budget or self._budget):
            inputs = self.processor(images=images or None, text=prompt, return_tensors="pt").to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def image_tokens(self, image, budget: str | None = None) -> int:
        """How many tokens of the prompt `image` takes at `budget` (default: the session's; LLaVA 1.6 tiles an
        image: ~2,900 for a large square one at "high")."""
        budget = budget or self._budget
        key = (id(image), budget)
        if key not in self._image_tokens:
            with image_budget(self.model, self.processor, budget):
                ids = self.processor(images=image, text=self.processor.image_token, return_tensors="pt")["input_ids"]
            self._image_tokens[key] = (image, int((ids == self.model.config.image_token_index).sum()))
        return self._image_tokens[key][1]

    # --- a turn ------------------------------------------------------------------------------------------------------

    def _prepare(self, text: str, images):
        """(turns, inputs, generate_kwargs): the turns to send, after any trimming, their model inputs, and the
        generation settings. The session itself is not changed until the answer is complete."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"The question must be a non-empty string, not {text!r}.")
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        opened = [imaging.open_image(im) for im in images]
        turn = Turn("user", text.strip(), opened)
        if not opened and not self.images:
            raise ValueError("No image yet: LLaVA answers about images. Pass one with this question, e.g. "
                             "session.send('What is in this picture?', images=['photo.jpg']).")
        turns = [*self.turns, turn]
        kwargs = self.settings.generate_kwargs()
        budget = self.context_limit - kwargs["max_new_tokens"]
        # "auto": the whole grid, then fewer tiles, before any turn is dropped or refused
        budgets = ["high", "medium", "low"] if self.image_budget == "auto" else [self.image_budget]
        while True:
            for images_at in budgets:
                inputs = self.inputs(turns, images_at)
                length = inputs["input_ids"].shape[1]
                if length <= budget:
                    if images_at != budgets[0]:
                        print(f"Images at the {images_at!r} budget ({length} prompt tokens) to fit the model's "
                              f"context of {self.context_limit} tokens.")
                    self._budget = images_at
                    return turns, inputs, kwargs
            if self.on_overflow == "error" or len(turns) <= 1:
                raise ValueError(
                    f"This turn needs {length} prompt tokens + {self.context_limit - budget} new tokens, more than "
                    f"the model's context of {self.context_limit} tokens (images take "
                    f"{', '.join(str(self.image_tokens(im, budgets[-1])) for t in turns for im in t.images) or 'none'}"
                    " tokens). Undo or reset the conversation, use fewer or smaller images"
                    + (", image_budget='low'" if budgets[-1] != "low" else "") + ", lower max_new_tokens"
                    + (", or create the session with on_overflow='drop_oldest'." if self.on_overflow == "error"
                       else "."))
            dropped = turns[:2] if len(turns) > 2 else turns[:1]
            turns = turns[len(dropped):]
            n_images = sum(len(t.images) for t in dropped)
            print(f"Context full ({length} of {self.context_limit} tokens): dropped the oldest {len(dropped)} "
                  f"message(s){f' and {n_images} image(s)' if n_images else ''}.")

    def _generate(self, inputs, kwargs: dict, streamer=None, stop=None):
        import torch
        from transformers import StoppingCriteriaList

        kwargs = dict(kwargs)
        if self.settings.seed is not None:
            torch.manual_seed(self.settings.seed)
        if stop is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([stop])
        with torch.inference_mode(), image_budget(self.model, self.processor, self._budget):
            return self.model.generate(**inputs, streamer=streamer, **kwargs)

    def send(self, text: str, images=None) -> str:
        """Ask `text` (with optional new images: PIL images, paths or URLs) and return the answer."""
        turns, inputs, kwargs = self._prepare(text, images)
        output = self._generate(inputs, kwargs)
        answer = self.processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        self.turns = [*turns, Turn("assistant", answer)]
        return answer

    def stream(self, text: str, images=None):
        """Like send(), but yields the answer in pieces as it is generated. The turn is kept once the answer is
        complete; closing the stream early stops generation and keeps nothing."""
        from transformers import TextIteratorStreamer

        turns, inputs, kwargs = self._prepare(text, images)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=600)
        stop = _StopFlag()
        errors = []

        def run():
            try:
                self._generate(inputs, kwargs, streamer=streamer, stop=stop)
            except BaseException as e:  # reported in the caller's thread, not lost in this one
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        pieces = []
        try:
            for piece in streamer:
                pieces.append(piece)
                yield piece
        finally:
            stop.event.set()
            thread.join()
        if errors:
            raise errors[0]
        self.turns = [*turns, Turn("assistant", "".join(pieces).strip())]

    def undo(self) -> None:
        """Remove the last question and its answer."""
        users = [i for i, t in enumerate(self.turns) if t.role == "user"]
        if not users:
            raise ValueError("Nothing to undo: the conversation is empty.")
        self.turns = self.turns[:users[-1]]

    def reset(self) -> None:
        self.turns = []

    # --- transcripts -------------------------------------------------------------------------------------------------

    def export(self, folder=None) -> tuple[Path, Path]:
        """Write transcript.md, transcript.json and the images (PNG) into `folder` (default: a new numbered folder in
        the project's outputs/chats). Returns the paths of the Markdown and the JSON."""
        folder = Path(folder) if folder else storage.next_free_path(storage.project_paths().outputs / "chats", "")
        record = {"format": TRANSCRIPT_FORMAT, "model": str(getattr(self.model.config, "_name_or_path", "")),
                  "system_prompt": self.system_prompt, "settings": asdict(self.settings), "turns": []}
        markdown = [f"# Chat with {record['model'] or 'LLaVA'}", ""]
        n = 0
        for turn in self.turns:
            names = []
            for image in turn.images:
                n += 1
                names.append(f"images/image-{n:02d}.png")
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                storage.atomic_write(folder / names[-1], buffer.getvalue())  # retried, else to local disk
            record["turns"].append({"role": turn.role, "text": turn.text, "images": names})
            markdown += [f"**{'You' if turn.role == 'user' else 'LLaVA'}:**", ""]
            markdown += [f"![image {name}]({name})" for name in names] + ([""] if names else [])
            markdown += [turn.text, ""]
        json_path = storage.atomic_write(folder / "transcript.json", json.dumps(record, indent=2, ensure_ascii=False))
        md_path = storage.atomic_write(folder / "transcript.md", "\n".join(markdown))
        return md_path, json_path

    @classmethod
    def load(cls, json_path, model, processor, **kwargs) -> "ChatSession":
        """A session restored from an exported transcript.json (its images from beside it)."""
        json_path = Path(json_path)
        record = json.loads(json_path.read_text(encoding="utf-8"))
        if record.get("format") != TRANSCRIPT_FORMAT:
            raise ValueError(f"{str(json_path)!r} is not a chat transcript of this project "
                             f"(format {record.get('format')!r}, expected {TRANSCRIPT_FORMAT!r}).")
        session = cls(model, processor, system_prompt=record["system_prompt"],
                      settings=GenerationSettings(**record["settings"]), **kwargs)
        session.turns = [Turn(t["role"], t["text"], [imaging.open_image(json_path.parent / name)
                                                     for name in t["images"]]) for t in record["turns"]]
        return session


def ask(model, processor, image, question: str, max_new_tokens: int = 128, **settings) -> str:
    """LLaVA's answer to one `question` about `image` (PIL image, path or URL); greedy unless a temperature is
    given. The prompt is built with the checkpoint's own chat template, never by hand."""
    if image is None:
        raise ValueError("`image` is missing: LLaVA answers about an image (a PIL image, a path or a URL).")
    session = ChatSession(model, processor, settings=GenerationSettings(max_new_tokens=max_new_tokens, **settings))
    return session.send(question, images=[image])
