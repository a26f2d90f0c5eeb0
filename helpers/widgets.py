"""ipywidgets panels: another way to drive the plain functions of vlm, captions and reasoning. They hold no logic of
their own, and each runs headless (set the widgets' values, call `.click()`), which is how the tests drive them."""
import contextlib
import html
import io
from pathlib import Path

import ipywidgets as w

from . import captions, reasoning, vlm


def uploaded_images(value) -> list:
    """PIL images from a FileUpload's value (ipywidgets 8: a tuple of dicts; 7.x, as on Colab: a dict by name)."""
    from PIL import Image

    files = value.values() if isinstance(value, dict) else value
    return [Image.open(io.BytesIO(bytes(f["content"]))) for f in files]


def _clear_upload(upload: w.FileUpload) -> None:
    """Empty the upload box, so the next question does not attach the same files again."""
    if isinstance(upload.value, dict):  # ipywidgets 7 (Colab): value is read-only; its dict clears in place
        upload.value.clear()
        with contextlib.suppress(Exception):
            upload._counter = 0  # the "(1)" on the button; the known workaround (ipywidgets issue 2653)
    else:
        upload.value = ()


def _error(e: Exception) -> str:
    return f"<p style='color:#b00'><b>{type(e).__name__}:</b> {html.escape(str(e))}</p>"


class ChatPanel(w.VBox):
    """Upload images, ask, watch the answer stream in; undo, reset, export the transcript."""

    def __init__(self, session: vlm.ChatSession):
        self.session = session
        self.upload = w.FileUpload(accept="image/*", multiple=True, description="Images")
        self.question = w.Textarea(placeholder="Ask about the image...", layout=w.Layout(width="100%"))
        self.send_button = w.Button(description="Send", button_style="primary")
        self.undo_button = w.Button(description="Undo")
        self.reset_button = w.Button(description="Reset")
        self.export_button = w.Button(description="Export")
        self.history = w.HTML()
        self.status = w.HTML()
        self.send_button.on_click(lambda _: self.send())
        self.undo_button.on_click(lambda _: self._do(self.session.undo))
        self.reset_button.on_click(lambda _: self._do(self.session.reset))
        self.export_button.on_click(lambda _: self.export())
        super().__init__([self.history, self.upload, self.question,
                          w.HBox([self.send_button, self.undo_button, self.reset_button, self.export_button]),
                          self.status])

    def _render(self, streaming: str = "") -> None:
        rows = []
        for turn in self.session.turns:
            who = "You" if turn.role == "user" else "LLaVA"
            cost = "".join(f" [image: {self.session.image_tokens(im)} tokens]" for im in turn.images)
            rows.append(f"<p><b>{who}:</b>{cost} {html.escape(turn.text)}</p>")
        if streaming:
            rows.append(f"<p><b>LLaVA:</b> {html.escape(streaming)}</p>")
        self.history.value = "".join(rows)

    def _do(self, action) -> None:
        try:
            action()
            self.status.value = ""
        except ValueError as e:
            self.status.value = _error(e)
        self._render()

    def send(self) -> None:
        try:
            images = uploaded_images(self.upload.value)
            answer = ""
            for piece in self.session.stream(self.question.value, images=images):
                answer += piece
                self._render(streaming=answer)
            self.question.value = ""
            _clear_upload(self.upload)
            self.status.value = ""
        except (ValueError, OSError) as e:
            self.status.value = _error(e)
        self._render()

    def export(self) -> None:
        try:
            md, js = self.session.export()
            self.status.value = f"<p>Saved {html.escape(str(md))} and {html.escape(str(js))}</p>"
        except (ValueError, OSError) as e:
            self.status.value = _error(e)


class CaptionPanel(w.VBox):
    """Caption a folder (style, trigger word, overwrite), then review and edit the captions."""

    def __init__(self, model, processor, folder: str = ""):
        self.model, self.processor = model, processor
        self.folder = w.Text(value=str(folder), description="Folder", layout=w.Layout(width="100%"))
        self.style = w.Dropdown(options=list(captions.STYLES), value="detailed", description="Style")
        self.trigger = w.Text(description="Trigger", placeholder="optional, e.g. sks")
        self.overwrite = w.Checkbox(description="Overwrite existing captions")
        self.run_button = w.Button(description="Caption", button_style="primary")
        self.status = w.HTML()
        self.review = ReviewGrid()
        self.run_button.on_click(lambda _: self.run())
        super().__init__([self.folder, w.HBox([self.style, self.trigger]), self.overwrite, self.run_button,
                          self.status, self.review])

    def run(self) -> None:
        try:
            report = captions.caption_folder(self.folder.value, self.model, self.processor, style=self.style.value,
                                             trigger=self.trigger.value or None, overwrite=self.overwrite.value,
                                             progress=False)
            self.status.value = "<pre>" + html.escape(str(report)) + "</pre>"
            self.review.load(self.folder.value)
        except (ValueError, OSError) as e:
            self.status.value = _error(e)


class ReviewGrid(w.VBox):
    """Thumbnails with their captions in editable boxes; Save writes the edited ones back."""

    def __init__(self, thumbnail: int = 160):
        self.thumbnail = thumbnail
        self.boxes: dict[Path, w.Textarea] = {}
        self.save_button = w.Button(description="Save captions")
        self.status = w.HTML()
        self.save_button.on_click(lambda _: self.save())
        super().__init__([])

    def load(self, folder) -> None:
        from . import images as imaging

        rows = []
        self.boxes = {}
        for path, caption in captions.read_captions(folder).items():
            try:
                image = imaging.open_image(path)
            except (OSError, ValueError):
                continue
            image.thumbnail((self.thumbnail, self.thumbnail))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            self.boxes[path] = w.Textarea(value=caption, layout=w.Layout(width="100%", height="80px"))
            rows.append(w.HBox([w.Image(value=buffer.getvalue(), format="png"),
                                w.VBox([w.Label(path.name), self.boxes[path]], layout=w.Layout(width="100%"))]))
        self.children = [*rows, self.save_button, self.status]

    def save(self) -> None:
        saved = [captions.save_caption(path, box.value) for path, box in self.boxes.items()]
        self.status.value = f"<p>Saved {len(saved)} caption(s).</p>"


class ReasoningPanel(w.VBox):
    """An image, a question and optional choices (one per line); shows the steps and the answer."""

    def __init__(self, model, processor, image=None):
        self.model, self.processor, self.image = model, processor, image
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="Image")
        self.question = w.Textarea(placeholder="Question", layout=w.Layout(width="100%"))
        self.choices = w.Textarea(placeholder="Choices, one per line (optional)", layout=w.Layout(width="100%"))
        self.run_button = w.Button(description="Reason", button_style="primary")
        self.result = w.HTML()
        self.run_button.on_click(lambda _: self.run())
        super().__init__([self.upload, self.question, self.choices, self.run_button, self.result])

    def run(self) -> None:
        try:
            uploaded = uploaded_images(self.upload.value)
            image = uploaded[0] if uploaded else self.image
            choices = [c.strip() for c in self.choices.value.splitlines() if c.strip()] or None
            result = reasoning.reason(self.model, self.processor, image, self.question.value, choices)
            steps = "".join(f"<li>{html.escape(s)}</li>" for s in result.steps)
            chosen = f" (option {result.choice})" if result.choice else ""
            self.result.value = (f"<ol>{steps}</ol><p><b>Answer:</b> {html.escape(result.answer)}{chosen}</p>")
        except (ValueError, OSError) as e:
            self.result.value = _error(e)
