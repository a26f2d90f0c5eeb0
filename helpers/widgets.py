"""ipywidgets panels: another way to drive the plain functions of vlm, captions and reasoning. They hold no logic of
their own, and each runs headless (set the widgets' values, call `.click()`), which is how the tests drive them.

Every panel shows its own work inside itself, in every front end: what the work prints and its progress bars land in
the panel's `output` (an Output widget; in JupyterLab with ipywidgets 8 they would go to the Log Console otherwise), its
buttons are disabled while it runs, and errors show in red in its `status`. `close()` lets go of the models (the
notebooks' "Free the GPU" cells call it); the panel stays on screen and says so when used after."""
import base64
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


CLOSED = "This panel was closed and let go of its model. Load the model again and run the panel's cell for a new one."
WORKING = "<p style='color:#666'>working...</p>"
STYLE = {"description_width": "initial"}   # labels shown whole, never cut


def _slider(kind, **kwargs):
    """A slider with its whole label and a track long enough to drag."""
    return kind(style=STYLE, layout=w.Layout(width="340px"), **kwargs)


def _row(*children) -> w.HBox:
    """Widgets side by side that wrap onto the next line where the panel is narrow."""
    return w.HBox(list(children), layout=w.Layout(flex_flow="row wrap", align_items="center"))


def _png_bytes(image, size: int | None = None) -> tuple[bytes, int]:
    """The image (shrunk to fit `size` x `size`, never enlarged) as PNG bytes, and its width."""
    thumb = image.copy()
    if size:
        thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return buffer.getvalue(), thumb.width


def _image_widget(png: bytes, width: int) -> w.Image:
    """An Image shown at most at its natural width and never wider than the panel, at its aspect (a bare
    widgets.Image in a VBox is stretched to the output's full width)."""
    return w.Image(value=png, format="png",
                   layout=w.Layout(width=f"{width}px", max_width="100%", height="auto", object_fit="contain"))


def _thumbnail(image, size: int = 256) -> w.Image:
    return _image_widget(*_png_bytes(image, size))


class _Panel(w.VBox):
    """What the panels share: the output (prints, progress bars), busy buttons, close()."""

    closed = False
    _buttons: tuple = ()

    def _start(self, children, buttons) -> None:
        """Lay out `children` (top to bottom; `self.output` among them, right under the buttons, where the person
        who pressed one is looking); `buttons` are disabled while the panel works."""
        self._buttons = tuple(buttons)
        super().__init__(list(children))

    def _new_output(self) -> w.Output:
        self.output = w.Output(layout=w.Layout(max_height="300px", overflow="auto"))
        return self.output

    def _work(self, action) -> None:
        """Run `action` with the buttons disabled and what it prints (progress bars too) in the panel's output."""
        if self.closed:
            self.status.value = _error(RuntimeError(CLOSED))
            return
        for button in self._buttons:
            button.disabled = True
        self.output.clear_output()
        self.status.value = WORKING   # each action puts its own outcome here
        try:
            with self.output:   # in a kernel an unexpected error's traceback lands here too, not in a hidden console
                action()
        finally:
            if self.status.value == WORKING:
                self.status.value = ""
            for button in self._buttons:
                button.disabled = False

    def _release(self) -> None:
        """Drop the references to the models (each panel names its own)."""

    def close(self) -> None:
        """Let go of the models so that the notebook's "Free the GPU" cell frees their memory. The panel stays on
        screen and says it was closed; its buttons then only say so."""
        self._release()
        self.closed = True
        self.status.value = _error(RuntimeError(CLOSED))

    def __del__(self):
        w.VBox.close(self)   # at garbage collection: ipywidgets' own close (the comm), not the release above


class ChatPanel(_Panel):
    """Upload images, ask, watch the answer stream in; undo, reset, export the transcript. Shows the session's turns
    (those it already had too) with a thumbnail of each image."""

    def __init__(self, session: vlm.ChatSession):
        self.session = session
        self._thumbs: dict[int, tuple] = {}   # id(image) -> (image, data URI): each thumbnail encoded once
        self.upload = w.FileUpload(accept="image/*", multiple=True, description="Images")
        self.question = w.Textarea(placeholder="Ask about the image...", layout=w.Layout(width="100%"))
        self.send_button = w.Button(description="Send", button_style="primary")
        self.undo_button = w.Button(description="Undo")
        self.reset_button = w.Button(description="Reset")
        self.export_button = w.Button(description="Export")
        self.history = w.HTML()
        self.status = w.HTML()
        self.send_button.on_click(lambda _: self._work(self.send))
        self.undo_button.on_click(lambda _: self._work(lambda: self._do(self.session.undo)))
        self.reset_button.on_click(lambda _: self._work(lambda: self._do(self.session.reset)))
        self.export_button.on_click(lambda _: self._work(self.export))
        buttons = (self.send_button, self.undo_button, self.reset_button, self.export_button)
        self._start([self.history, self.upload, self.question, _row(*buttons), self._new_output(), self.status],
                    buttons)
        self._render()

    def _release(self) -> None:
        self.session = None
        self._thumbs = {}

    def _thumb(self, image) -> str:
        if id(image) not in self._thumbs:
            png, _ = _png_bytes(image, 96)
            self._thumbs[id(image)] = (image, "data:image/png;base64," + base64.b64encode(png).decode())
        return self._thumbs[id(image)][1]

    def _render(self, asking: tuple = (), streaming: str = "") -> None:
        """The session's turns; while an answer streams in, the question asked (with its images) and the answer so
        far under them."""
        turns = [("You" if turn.role == "user" else "LLaVA", turn.text, turn.images) for turn in self.session.turns]
        if asking:
            turns += [("You", *asking), ("LLaVA", streaming, [])]
        rows = []
        for who, text, images in turns:
            shown = "".join(
                f"<figure style='display:inline-block;margin:2px 6px 2px 0;text-align:center'>"
                f"<img src='{self._thumb(im)}' style='max-width:96px;max-height:96px'>"
                f"<figcaption style='font-size:smaller'>[image: {self.session.image_tokens(im)} tokens]</figcaption>"
                f"</figure>" for im in images)
            rows.append(f"<div>{shown}</div>" if shown else "")
            rows.append(f"<p><b>{who}:</b> {html.escape(text)}</p>")
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
            question, answer = self.question.value, ""
            for piece in self.session.stream(question, images=images):
                answer += piece
                self._render((question, images), streaming=answer)
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


class CaptionPanel(_Panel):
    """Caption a folder (style, trigger word, overwrite), then review and edit the captions."""

    def __init__(self, model, processor, folder: str = ""):
        self.model, self.processor = model, processor
        self.folder = w.Text(value=str(folder), description="Folder", layout=w.Layout(width="100%"))
        self.style = w.Dropdown(options=list(captions.STYLES), value="detailed", description="Style")
        self.trigger = w.Text(description="Trigger", placeholder="optional, e.g. sks")
        self.overwrite = w.Checkbox(description="Overwrite existing captions", style=STYLE)
        self.run_button = w.Button(description="Caption", button_style="primary")
        self.status = w.HTML()
        self.review = ReviewGrid()
        self.run_button.on_click(lambda _: self._work(self.run))
        self._start([self.folder, _row(self.style, self.trigger), self.overwrite, self.run_button,
                     self._new_output(), self.status, self.review], [self.run_button])

    def _release(self) -> None:
        self.model = self.processor = None

    def run(self) -> None:
        try:
            report = captions.caption_folder(self.folder.value, self.model, self.processor, style=self.style.value,
                                             trigger=self.trigger.value or None, overwrite=self.overwrite.value)
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
            self.boxes[path] = w.Textarea(value=caption, layout=w.Layout(width="100%", height="80px"))
            picture = _thumbnail(image, self.thumbnail)
            picture.layout.flex = "0 0 auto"
            rows.append(w.HBox([picture, w.VBox([w.Label(path.name), self.boxes[path]],
                                                layout=w.Layout(flex="1 1 auto"))]))
        self.children = [*rows, self.save_button, self.status]

    def save(self) -> None:
        saved = [captions.save_caption(path, box.value) for path, box in self.boxes.items()]
        self.status.value = f"<p>Saved {len(saved)} caption(s).</p>"


class ReasoningPanel(_Panel):
    """An image, a question and optional choices (one per line); shows the steps and the answer."""

    def __init__(self, model, processor, image=None):
        self.model, self.processor, self.image = model, processor, image
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="Image")
        self.question = w.Textarea(placeholder="Question", layout=w.Layout(width="100%"))
        self.choices = w.Textarea(placeholder="Choices, one per line (optional)", layout=w.Layout(width="100%"))
        self.run_button = w.Button(description="Reason", button_style="primary")
        self.result = w.HTML()
        self.status = self.result
        self.run_button.on_click(lambda _: self._work(self.run))
        self._start([self.upload, self.question, self.choices, self.run_button, self._new_output(), self.result],
                    [self.run_button])

    def _release(self) -> None:
        self.model = self.processor = None

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


def _png(image, size: int = 256) -> bytes:
    return _png_bytes(image, size)[0]


class GeneratePanel(_Panel):
    """Prompt, negative, sampler, steps, CFG, seed, size, batch, LoRAs, and a gallery; Generate calls
    diffusion.generate and saves every image (with its parameters) unless told not to."""

    def __init__(self, pipe, model_name: str | None = None, save: bool = True):
        from . import samplers

        self.pipe, self.model_name, self.result = pipe, model_name, None
        self.prompt = w.Textarea(placeholder="prompt, (word:1.2) weighting works", layout=w.Layout(width="100%"))
        self.negative = w.Textarea(placeholder="negative prompt", layout=w.Layout(width="100%"))
        sampler_names, schedule_types = samplers.offered(pipe)   # A1111's two dropdowns
        self.sampler = w.Dropdown(options=sampler_names, value=samplers.DEFAULT_SAMPLER if samplers.DEFAULT_SAMPLER
                                  in sampler_names else sampler_names[0], description="Sampler", style=STYLE)
        self.schedule_type = w.Dropdown(options=schedule_types, value=samplers.DEFAULT_SCHEDULE_TYPE,
                                        description="Schedule type", style=STYLE)
        self.steps = _slider(w.IntSlider, value=25, min=1, max=100, description="Steps")
        self.cfg = _slider(w.FloatSlider, value=7.0, min=0, max=20, step=0.5, description="CFG scale")
        self.seed = w.IntText(value=-1, description="Seed (-1: random)", style=STYLE)
        self.width = _slider(w.IntSlider, value=512, min=256, max=1536, step=64, description="Width")
        self.height = _slider(w.IntSlider, value=512, min=256, max=1536, step=64, description="Height")
        self.batch_size = _slider(w.IntSlider, value=1, min=1, max=8, description="Batch size")
        self.batch_count = _slider(w.IntSlider, value=1, min=1, max=16, description="Batch count")
        self.lora_source = w.Text(placeholder="LoRA: file, hub id or Drive link", layout=w.Layout(width="60%"))
        self.lora_scale = _slider(w.FloatSlider, value=0.8, min=-1, max=2, step=0.05, description="LoRA scale")
        self.add_lora_button = w.Button(description="Add LoRA")
        self.save = w.Checkbox(value=save, description="Save to Drive", style=STYLE)
        self.generate_button = w.Button(description="Generate", button_style="primary")
        self.gallery = _row()
        self.status = w.HTML()
        self.add_lora_button.on_click(lambda _: self._work(self.add_lora))
        self.generate_button.on_click(lambda _: self._work(self.generate))
        self._start([self.prompt, self.negative, _row(self.sampler, self.schedule_type),
                     _row(self.steps, self.cfg), _row(self.width, self.height), _row(self.batch_size, self.batch_count),
                     _row(self.lora_source, self.lora_scale, self.add_lora_button),
                     _row(self.seed, self.generate_button, self.save), self._new_output(), self.status,
                     self.gallery],
                    [self.generate_button, self.add_lora_button])

    def _release(self) -> None:
        self.pipe = self.result = None

    def add_lora(self) -> None:
        from . import lora

        try:
            name = lora.load_lora(self.pipe, self.lora_source.value, scale=self.lora_scale.value)
            loaded = ", ".join(f"{n} ({s:g})" for n, s in lora.active_loras(self.pipe).items())
            self.status.value = f"<p>Loaded LoRA {html.escape(name)}. Active: {html.escape(loaded)}</p>"
        except (ValueError, OSError) as e:
            self.status.value = _error(e)

    def generate(self) -> None:
        from . import diffusion

        try:
            self.result = diffusion.generate(
                self.pipe, self.prompt.value, negative_prompt=self.negative.value, sampler=self.sampler.value,
                schedule_type=self.schedule_type.value, num_inference_steps=self.steps.value,
                guidance_scale=self.cfg.value, seed=self.seed.value,
                width=self.width.value, height=self.height.value, num_images_per_prompt=self.batch_size.value,
                batch_count=self.batch_count.value, model_name=self.model_name)
        except (ValueError, OSError, FloatingPointError) as e:
            self.status.value = _error(e)
            return
        self.gallery.children = [_thumbnail(im, 512) for im in self.result.images]
        seeds = ", ".join(map(str, self.result.seeds))
        saved = f"; saved {len(self.result.save())} PNG(s) with their parameters" if self.save.value else ""
        self.status.value = f"<p>seeds {seeds}{saved}</p>"


class InpaintPanel(_Panel):
    """An image and a mask (painted on the image, uploaded, or a shape from sliders), a live preview of the area to
    repaint, and Inpaint, which calls diffusion.generate with the mask and saves the result."""

    MASK_SOURCES = ("paint", "upload", "shape")

    def __init__(self, pipe, image=None, model_name: str | None = None):
        from . import masks

        self.pipe, self.image, self.model_name, self.result = pipe, image, model_name, None
        self.uploaded_mask = None
        self.image_upload = w.FileUpload(accept="image/*", multiple=False, description="Image")
        self.mask_upload = w.FileUpload(accept="image/*", multiple=False, description="Mask")
        self.mask_source = w.ToggleButtons(options=self.MASK_SOURCES, value="shape", description="Mask from",
                                           style=STYLE)
        self.shape = w.Dropdown(options=list(masks.SHAPES), value="ellipse", description="Shape")
        self.x, self.y = (_slider(w.FloatSlider, value=v, min=0, max=1, step=0.01, description=d)
                          for v, d in ((0.3, "x"), (0.3, "y")))
        self.mask_width, self.mask_height = (_slider(w.FloatSlider, value=0.4, min=0, max=1, step=0.01,
                                                     description=d) for d in ("width", "height"))
        self.invert = w.Checkbox(description="Invert mask", style=STYLE)
        self.blur = _slider(w.IntSlider, value=4, min=0, max=64, description="Mask blur")
        self.only_masked = w.Checkbox(description="Only masked (with padding)", style=STYLE)
        self.padding = _slider(w.IntSlider, value=32, min=0, max=256, step=8, description="Padding")
        self.prompt = w.Textarea(placeholder="what to paint in the masked area", layout=w.Layout(width="100%"))
        self.strength = _slider(w.FloatSlider, value=1.0, min=0.05, max=1, step=0.05, description="Strength")
        self.seed = w.IntText(value=-1, description="Seed (-1: random)", style=STYLE)
        self.preview = w.Image(format="png", layout=w.Layout(max_width="100%", height="auto", object_fit="contain"))
        self.inpaint_button = w.Button(description="Inpaint", button_style="primary")
        self.gallery = _row()
        self.status = w.HTML()
        self.canvas, canvas_note = self._make_canvas()
        for control in (self.mask_source, self.shape, self.x, self.y, self.mask_width, self.mask_height, self.invert):
            control.observe(lambda _: self.update_preview(), names="value")
        for control in (self.shape, self.x, self.y, self.mask_width, self.mask_height):
            control.observe(lambda _: self._use("shape"), names="value")
        self.image_upload.observe(lambda _: self._take_uploads(), names="value")
        self.mask_upload.observe(lambda _: self._take_uploads(), names="value")
        self.inpaint_button.on_click(lambda _: self._work(self.inpaint))
        preview = w.VBox([w.HTML("<b>Area to repaint</b> (red)"), self.preview], layout=w.Layout(margin="0 0 0 12px"))
        shown = preview
        if self.canvas is not None:   # side by side where there is room, tops aligned
            shown = w.HBox([self.canvas, preview], layout=w.Layout(flex_flow="row wrap", align_items="flex-start"))
        # the shape's controls only while the mask is a shape (a painted or uploaded mask does not use them)
        self.shape_controls = w.VBox([_row(self.shape), _row(self.x, self.y), _row(self.mask_width, self.mask_height)])
        self.mask_source.observe(lambda _: self._show_shape_controls(), names="value")
        self._show_shape_controls()
        self._start([_row(self.image_upload, self.mask_upload), self.mask_source, shown, canvas_note,
                     self.shape_controls, _row(self.invert, self.only_masked), _row(self.blur, self.padding),
                     self.prompt,
                     _row(self.strength, self.seed, self.inpaint_button), self._new_output(), self.status,
                     self.gallery], [self.inpaint_button])
        self.update_preview()

    def _show_shape_controls(self) -> None:
        self.shape_controls.layout.display = "" if self.mask_source.value == "shape" else "none"

    def _make_canvas(self):
        """The paint canvas, and a note where painting is not possible here."""
        from . import canvas

        if not canvas.available():
            return None, w.HTML(f"<p>{html.escape(canvas.UNAVAILABLE)}</p>")
        board = canvas.MaskCanvas(self.image, layout=w.Layout(max_width="100%"))
        board.observe(lambda _: self._use("paint"), names="mask")
        board.observe(lambda _: self.update_preview(), names="mask")
        return board, canvas.fallback_note(board)

    def _use(self, source: str) -> None:
        self.mask_source.value = source

    def _release(self) -> None:
        self.pipe = self.result = None

    def _take_uploads(self) -> None:
        uploaded = uploaded_images(self.image_upload.value)
        if uploaded and uploaded[0] is not None:
            self.image = uploaded[0].convert("RGB")
            if self.canvas is not None:
                self.canvas.set_image(self.image)
        masks_up = uploaded_images(self.mask_upload.value)
        self.uploaded_mask = masks_up[0] if masks_up else None
        if self.uploaded_mask is not None:
            self._use("upload")
        elif self.mask_source.value == "upload":
            self._use("shape")
        self.update_preview()

    def mask(self):
        """The mask as the controls say now: painted, uploaded or a shape (Mask from), inverted if asked."""
        from . import masks

        source = self.mask_source.value
        if source == "upload" and self.uploaded_mask is not None:
            mask = masks.load_mask(self.uploaded_mask, size=self.image.size)
        elif source == "paint" and self.canvas is not None:
            mask = self.canvas.mask_image(size=self.image.size)
        else:
            mask = masks.shape_mask(self.image.size, self.shape.value, self.x.value, self.y.value,
                                    self.mask_width.value, self.mask_height.value)
        return masks.invert(mask) if self.invert.value else mask

    def update_preview(self) -> None:
        from . import masks

        if self.image is None:
            return
        try:
            png, width = _png_bytes(masks.preview(self.image, self.mask()), 384)
            self.preview.value = png
            self.preview.layout.width = f"{width}px"
            self.status.value = ""
        except ValueError as e:
            self.status.value = _error(e)

    def inpaint(self) -> None:
        from . import diffusion

        if self.image is None:
            self.status.value = _error(ValueError("Upload an image first."))
            return
        try:
            self.result = diffusion.generate(
                self.pipe, self.prompt.value, image=self.image, mask_image=self.mask(), strength=self.strength.value,
                mask_blur=self.blur.value, inpaint_area="only_masked" if self.only_masked.value else "whole",
                padding=self.padding.value, seed=self.seed.value, model_name=self.model_name)
        except (ValueError, OSError, FloatingPointError) as e:
            self.status.value = _error(e)
            return
        self.gallery.children = [_thumbnail(im, 512) for im in self.result.images]
        self.status.value = f"<p>seed {self.result.seeds[0]}; saved {html.escape(str(self.result.save()[0]))}</p>"


class BenchmarkPanel(_Panel):
    """Models, steps, size, prompts, seed, shape-true and quality switches; Run calls bench.run_benchmark and
    bench.write_results and shows the table, the plots and one grid a prompt."""

    MODELS = ("sd15", "sdxl", "sd3-medium", "flux-schnell", "flux-dev")

    def __init__(self, models=("sd15", "sdxl"), out=None):
        self.out, self.result, self.files = out, None, {}
        self.models = w.SelectMultiple(options=tuple(dict.fromkeys([*self.MODELS, *models])), value=tuple(models),
                                       description="Models", rows=5)
        self.steps = _slider(w.IntSlider, value=0, min=0, max=50, description="Steps (0: each model's usual)")
        self.size = w.Dropdown(options=[("native", 0), ("512", 512), ("768", 768), ("1024", 1024)], value=0,
                               description="Size")
        self.prompts = w.Textarea(placeholder="one prompt a line; empty: the 12 PartiPrompts of assets/prompts",
                                  layout=w.Layout(width="100%"))
        self.seed = w.IntText(value=0, description="Seed")
        self.shape_true = w.Checkbox(value=False, description="shape-true (random weights: speed and memory only)",
                                     style=STYLE, layout=w.Layout(width="auto"))
        self.quality = w.Checkbox(value=True, description="CLIP score", style=STYLE)
        self.run_button = w.Button(description="Run", button_style="primary")
        self.table = w.HTML()
        self.plots = _row()
        self.grids = w.VBox()
        self.status = w.HTML()
        self.run_button.on_click(lambda _: self._work(self.run))
        self._start([_row(self.models, w.VBox([self.steps, self.size, self.seed])), self.prompts,
                     _row(self.shape_true, self.quality), self.run_button, self._new_output(), self.status,
                     self.table,
                     self.plots, self.grids], [self.run_button])

    def settings(self) -> list[dict]:
        setting = {"num_inference_steps": self.steps.value or None, "size": self.size.value or None}
        return [{k: v for k, v in setting.items() if v is not None}]

    def run(self) -> None:
        from . import bench
        from .bench import report

        prompts = [line.strip() for line in self.prompts.value.splitlines() if line.strip()] or None
        try:
            self.result = bench.run_benchmark(list(self.models.value), prompts=prompts, seed=self.seed.value,
                                              settings=self.settings(), shape_true=self.shape_true.value,
                                              quality=self.quality.value)
            self.files = bench.write_results(self.result, self.out)
        except (ValueError, OSError, RuntimeError, FloatingPointError) as e:
            self.status.value = _error(e)
            return
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(report.cell_text(r, key))}</td>"
                                        for _, key in report.TABLE) + "</tr>" for r in self.result.rows)
        head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in report.TABLE)
        self.table.value = f"<div style='overflow-x:auto'><table><tr>{head}</tr>{rows}</table></div>"
        self.plots.children = [_file_image(self.files[k]) for k in ("speed_plot", "quality_plot") if k in self.files]
        self.grids.children = [w.VBox([w.HTML(f"<p>{i}. {html.escape(p)}</p>"), _file_image(path)])
                               for i, (p, path) in enumerate(zip(self.result.prompts, self.files["grids"]))]
        note = self.result.meta["note"]
        self.status.value = (f"<p>{html.escape(note)}. " if note else "<p>") + \
            f"Results in {html.escape(str(self.files['markdown'].parent))}</p>"


def _file_image(path) -> w.Image:
    """A PNG file shown at most at its natural size, scaled down to the panel's width at its aspect."""
    from PIL import Image

    with Image.open(path) as im:
        width = im.width
    return _image_widget(Path(path).read_bytes(), width)
