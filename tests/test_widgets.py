"""The panels, driven headless: set the widgets' values, click, and check they called the plain functions."""
import datetime
import io

import numpy as np
import pytest
from PIL import Image

from helpers import loading, vlm, widgets


@pytest.fixture(scope="module")
def llava():
    return loading.load_llava("llava-1.6-mistral-7b")


def png_bytes(w=48, h=40, seed=0):
    buffer = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("value", [
    ({"name": "a.png", "type": "image/png", "size": 1, "content": memoryview(png_bytes())},),  # ipywidgets 8
    {"a.png": {"metadata": {"name": "a.png"}, "content": png_bytes()}},                      # ipywidgets 7 (Colab)
])
def test_uploaded_images_in_both_ipywidgets_formats(value):
    (image,) = widgets.uploaded_images(value)
    assert image.size == (48, 40)


def test_chat_panel_streams_undoes_and_exports(llava, tmp_path, monkeypatch):
    monkeypatch.setenv("HELPERS_HOME", str(tmp_path))
    session = vlm.ChatSession(*llava, settings=vlm.GenerationSettings(max_new_tokens=3))
    panel = widgets.ChatPanel(session)
    panel.upload.value = ({"name": "a.png", "type": "image/png", "size": 1, "content": memoryview(png_bytes()),
                           "last_modified": datetime.datetime.now(datetime.timezone.utc)},)
    panel.question.value = "What is shown in this image?"
    panel.send_button.click()
    assert [t.role for t in session.turns] == ["user", "assistant"] and len(session.images) == 1
    assert panel.question.value == "" and panel.upload.value == ()
    assert "What is shown in this image?" in panel.history.value and "tokens]" in panel.history.value
    panel.question.value = "What color is it?"
    panel.send_button.click()
    assert len(session.turns) == 4
    panel.undo_button.click()
    assert len(session.turns) == 2 and "What color is it?" not in panel.history.value
    panel.export_button.click()
    assert "Saved" in panel.status.value and (tmp_path / "outputs" / "chats" / "00000" / "transcript.json").is_file()
    panel.reset_button.click()
    assert session.turns == [] and panel.history.value == ""


def test_chat_panel_shows_errors_instead_of_raising(llava):
    panel = widgets.ChatPanel(vlm.ChatSession(*llava))
    panel.question.value = "What is this?"
    panel.send_button.click()  # no image yet
    assert "No image yet" in panel.status.value and panel.session.turns == []


def test_caption_panel_captions_and_review_saves_edits(llava, tmp_path):
    for i in range(2):
        (tmp_path / f"p{i}.png").write_bytes(png_bytes(seed=i))
    panel = widgets.CaptionPanel(*llava, folder=str(tmp_path))
    panel.style.value = "short"
    panel.trigger.value = "sks"
    panel.run_button.click()
    assert "2 caption(s) written" in panel.status.value
    assert (tmp_path / "p0.txt").read_text().startswith("sks, ")
    box = panel.review.boxes[tmp_path / "p1.png"]
    box.value = "a hand-written caption"
    panel.review.save_button.click()
    assert (tmp_path / "p1.txt").read_text() == "a hand-written caption\n"


def test_caption_panel_reports_a_missing_folder(llava, tmp_path):
    panel = widgets.CaptionPanel(*llava, folder=str(tmp_path / "nope"))
    panel.run_button.click()
    assert "nope" in panel.status.value and "ValueError" in panel.status.value


def test_reasoning_panel(llava):
    image = Image.open(io.BytesIO(png_bytes()))
    panel = widgets.ReasoningPanel(*llava, image=image)
    panel.question.value = "Which is bigger?"
    panel.choices.value = "the circle\nthe square\n"
    panel.run_button.click()
    assert "<b>Answer:</b>" in panel.result.value
    panel.question.value = ""
    panel.run_button.click()
    assert "The question must be a non-empty string" in panel.result.value


# --- Stable Diffusion panels ----------------------------------------------------------------------------------------

def test_generate_panel_generates_saves_and_shows(sd, tmp_path, monkeypatch):
    from helpers import images

    monkeypatch.setenv("HELPERS_HOME", str(tmp_path))
    panel = widgets.GeneratePanel(sd, model_name="sd15")
    panel.prompt.value, panel.negative.value = "a photo of a (cat:1.2)", "blurry"
    panel.sampler.value, panel.schedule_type.value = "DPM++ 2M SDE", "Karras"   # A1111 1.9+'s two dropdowns
    panel.steps.value, panel.seed.value = 3, 9
    panel.width.value = panel.height.value = 256  # SMOKE MODE caps it to 64
    panel.batch_size.value = 2
    panel.generate_button.click()
    assert panel.result.seeds == [9, 10] and len(panel.gallery.children) == 2
    saved = sorted((tmp_path / "outputs" / "txt2img").glob("*.png"))
    assert [p.name for p in saved] == ["00000-9.png", "00001-10.png"] and "saved 2 PNG(s)" in panel.status.value
    params = images.read_parameters(saved[0])
    assert params["prompt"] == "a photo of a (cat:1.2)" and (params["Sampler"], params["Schedule type"]) == \
        ("DPM++ 2M SDE", "Karras")


def test_generate_panel_shows_errors(sd):
    panel = widgets.GeneratePanel(sd, save=False)
    panel.generate_button.click()  # empty prompt
    assert "`prompt` must be a non-empty string" in panel.status.value
    panel.lora_source.value = "no/such.safetensors"
    panel.add_lora_button.click()
    assert "No LoRA at" in panel.status.value


def test_inpaint_panel_previews_and_inpaints(tmp_path, monkeypatch):
    monkeypatch.setenv("HELPERS_HOME", str(tmp_path))
    pipe = loading.load_sd("sd15-inpaint", task="inpaint")
    pipe.set_progress_bar_config(disable=True)
    photo = Image.open(io.BytesIO(png_bytes(64, 64))).convert("RGB")
    panel = widgets.InpaintPanel(pipe, image=photo, model_name="sd15-inpaint")
    first = panel.preview.value
    panel.shape.value = "rectangle"
    panel.x.value = 0.5
    assert panel.preview.value and panel.preview.value != first  # the preview follows the sliders
    panel.prompt.value = "a red car"
    panel.seed.value = 3
    panel.inpaint_button.click()
    assert "saved" in panel.status.value and panel.result.images[0].size == (64, 64)
    mask = np.asarray(panel.mask())
    assert mask[:, :28].max() == 0 and mask[30:40, 34:56].min() == 255  # x=0.5, width 0.4 of 64 px
    panel.mask_upload.value = ({"name": "m.png", "type": "image/png", "size": 1,
                                "content": memoryview(_mask_png()), "last_modified": datetime.datetime.now()},)
    assert np.asarray(panel.mask()).max() == 0
    panel.inpaint_button.click()
    assert "all black" in panel.status.value


def _mask_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 0).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def one_torch_thread():
    """On 2 shared cores, 2 OpenMP threads competing with other processes made the tiny models 10-40x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_benchmark_panel_runs_the_harness_and_shows_table_plots_grids(tmp_path, one_torch_thread):
    panel = widgets.BenchmarkPanel(out=tmp_path / "bench")
    panel.models.value = ("sd15",)
    panel.steps.value, panel.size.value, panel.seed.value = 2, 512, 5  # SMOKE MODE caps the size to 64
    panel.prompts.value = "a red cat\n\na blue box\n"
    panel.quality.value = False
    panel.run_button.click()
    assert panel.result.prompts == ["a red cat", "a blue box"] and panel.result.seeds == [5, 6]
    (row,) = panel.result.rows
    assert (row["model"], row["steps"], row["width"], row["clip_score"]) == ("sd15", 2, 64, None)
    assert "<td>sd15</td>" in panel.table.value and "Results in" in panel.status.value
    assert len(panel.plots.children) == 1 and len(panel.grids.children) == 2  # no quality plot without scores
    assert (tmp_path / "bench" / "results.csv").is_file()
    panel.models.value = ()
    panel.run_button.click()
    assert "`models` is empty" in panel.status.value


# --- what a person sees: images that fit, busy buttons, close(), the chat's turns, the paint canvas -------------------

def test_chat_panel_shows_the_sessions_turns_with_thumbnails(llava):
    session = vlm.ChatSession(*llava, settings=vlm.GenerationSettings(max_new_tokens=2))
    session.send("What is shown?", images=[Image.open(io.BytesIO(png_bytes()))])
    panel = widgets.ChatPanel(session)   # a panel made after the turns
    assert "What is shown?" in panel.history.value and panel.history.value.count("data:image/png;base64,") == 1
    assert "tokens]" in panel.history.value


def test_chat_panel_keeps_the_question_in_view_while_the_answer_streams(llava, monkeypatch):
    session = vlm.ChatSession(*llava, settings=vlm.GenerationSettings(max_new_tokens=2))
    panel = widgets.ChatPanel(session)
    seen = []

    def stream(question, images=()):
        for piece in ("a ", "cat"):
            seen.append(panel.history.value)
            yield piece
        seen.append(panel.history.value)

    monkeypatch.setattr(session, "stream", stream)
    panel.upload.value = ({"name": "a.png", "type": "image/png", "size": 1, "content": memoryview(png_bytes()),
                           "last_modified": datetime.datetime.now(datetime.timezone.utc)},)
    panel.question.value = "What is shown?"
    panel.send_button.click()
    last = seen[-1]   # after the first piece: the question and its thumbnail, then the answer so far
    assert last.index("What is shown?") < last.index("LLaVA:</b> a ") and "data:image/png;base64," in last


def test_panels_disable_the_button_while_working_and_fit_images(sd, monkeypatch):
    from helpers import diffusion

    panel = widgets.GeneratePanel(sd, save=False)
    seen = []
    real = diffusion.generate

    def spy(*args, **kwargs):
        seen.append(panel.generate_button.disabled)
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusion, "generate", spy)
    panel.prompt.value, panel.steps.value, panel.seed.value = "a cat", 2, 1
    panel.generate_button.click()
    assert seen == [True] and not panel.generate_button.disabled
    (shown,) = panel.gallery.children
    assert (shown.layout.width, shown.layout.max_width) == ("64px", "100%")  # natural size, never wider than the panel
    assert panel.output in panel.children and panel.seed.style.description_width == "initial"


def test_close_lets_go_of_the_model_and_a_click_after_says_so(sd, llava):
    panel = widgets.GeneratePanel(sd, save=False)
    panel.close()
    assert panel.pipe is None and "closed" in panel.status.value
    panel.status.value = ""
    panel.prompt.value = "a cat"
    panel.generate_button.click()
    assert "closed" in panel.status.value and panel.result is None
    chat = widgets.ChatPanel(vlm.ChatSession(*llava))
    chat.close()
    chat.send_button.click()
    assert chat.session is None and "closed" in chat.status.value


def _stroke_png(size=(64, 64), line=((10, 20), (50, 20)), width=6) -> str:
    """What the canvas sends: a base64 PNG, white where painted on black."""
    import base64

    from PIL import ImageDraw

    im = Image.new("RGB", size, "black")
    ImageDraw.Draw(im).line(line, fill="white", width=width)
    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_painted_mask_is_where_the_stroke_was_and_inpaints(tmp_path, monkeypatch):
    monkeypatch.setenv("HELPERS_HOME", str(tmp_path))
    pipe = loading.load_sd("sd15-inpaint", task="inpaint")
    pipe.set_progress_bar_config(disable=True)
    photo = Image.open(io.BytesIO(png_bytes(64, 64))).convert("RGB")
    panel = widgets.InpaintPanel(pipe, image=photo, model_name="sd15-inpaint")
    assert panel.canvas is not None and (panel.canvas.image_width, panel.canvas.image_height) == (64, 64)
    before = panel.preview.value
    assert panel.shape_controls.layout.display == ""   # a shape at first: its sliders in view
    panel.canvas.mask = _stroke_png()
    assert panel.mask_source.value == "paint" and panel.preview.value != before
    assert panel.shape_controls.layout.display == "none"   # painting: the shape's sliders out of the way
    mask = np.asarray(panel.mask())
    assert mask.shape == (64, 64) and panel.mask().mode == "L"
    ys, xs = np.nonzero(mask > 127)
    assert (xs.min(), xs.max()) == (10, 50) and 16 <= ys.min() <= ys.max() <= 24   # the stroke, nothing else
    panel.prompt.value, panel.seed.value = "a red car", 3
    panel.inpaint_button.click()
    assert "saved" in panel.status.value and panel.result.images[0].size == (64, 64)
    result, original = np.asarray(panel.result.images[0]), np.asarray(photo)
    assert (result[40:] == original[40:]).all()   # paste-back: far from the (feathered) stroke nothing changed
    panel.canvas.invert()
    assert np.asarray(panel.mask())[40:].min() == 255
    panel.canvas.clear()
    panel.inpaint_button.click()
    assert "all black" in panel.status.value


def test_painted_mask_of_another_size_is_scaled_to_the_image():
    from helpers import canvas

    board = canvas.MaskCanvas(Image.new("RGB", (64, 32)))
    board.mask = _stroke_png(size=(128, 64), line=((0, 0), (127, 0)), width=2)
    assert board.mask_image().size == (64, 32)
    board.mask = "not a png"
    with pytest.raises(ValueError, match="not a base64 PNG"):
        board.mask_image()


def test_inpaint_panel_without_a_canvas_says_so_and_keeps_shapes(monkeypatch):
    from helpers import canvas

    monkeypatch.setattr(canvas, "available", lambda: False)
    photo = Image.open(io.BytesIO(png_bytes(64, 64))).convert("RGB")
    panel = widgets.InpaintPanel(None, image=photo)
    assert panel.canvas is None
    assert any("anywidget" in getattr(child, "value", "") for child in panel.children)
    panel.shape.value = "rectangle"
    assert np.asarray(panel.mask()).max() == 255 and panel.mask_source.value == "shape"
