"""Every panel as a person uses it, in a real browser (headless Chromium; JupyterLab 4 + ipywidgets 8, or Notebook 6.5
+ ipywidgets 7.7.1 in the Colab-stack job), SMOKE MODE: set values, press the button, see the work's progress inside
the panel while the button is disabled, see the result in the panel at a size a person can read (never stretched
past its natural size, never wider than the panel, at its aspect), and no widget or console errors."""
import re

import pytest
from frontends import chromium, notebook, screenshots, server  # noqa: F401 (fixtures: a conftest.py here would
#                                                       shadow tests/conftest.py, which the other tests import by name)

pytestmark = pytest.mark.browser

SLOW = """
def slowed(module, seconds):   # the tiny models are too quick to see the work while it runs
    step = module.forward
    def slow_step(*args, **kwargs):
        time.sleep(seconds)
        return step(*args, **kwargs)
    module.forward = slow_step
"""
IMAGE = "image = Image.fromarray((np.random.RandomState(0).rand(128, 128, 3) * 255).astype('uint8'))"
LLAVA = f"""\
import time
import numpy as np
from PIL import Image
from helpers import loading, vlm
model, processor = loading.load_llava("llava-1.6-mistral-7b")
{SLOW}
{IMAGE}"""
SD = f"""\
import time
import numpy as np
from PIL import Image
from helpers import loading
{SLOW}
{IMAGE}"""
BAR = re.compile(r"\d+/\d+\s+\[")   # a tqdm bar's text: "2/4 [00:01<00:01, ...]"


def _show_panel(page):
    """Run the setup cell (0) and the panel's cell (1); the panel (cell 1's output)."""
    page.run(0)
    page.run(1)
    return page.output(1)


def _button(panel, name: str):
    return panel.get_by_role("button", name=name, exact=True)


def _busy_then_done(page, panel, button, progress=BAR, timeout_s: float = 120, meanwhile=None) -> None:
    """Click `button`; while the work runs, its progress shows inside the panel and the button is disabled (and
    `meanwhile()`, where given, holds); then the button is enabled again."""
    from playwright.sync_api import expect

    button.click()
    shown = panel.get_by_text(progress).first
    shown.wait_for(timeout=60_000)
    busy = button.is_disabled()
    text = shown.inner_text()
    unfinished = not re.search(r"(\d+)/\1\s", text) if progress is BAR else True
    if meanwhile is not None:
        meanwhile()
    page.shot("running")
    expect(button).to_be_enabled(timeout=timeout_s * 1000)
    assert busy and unfinished, f"no progress seen inside the panel while it ran with the button disabled ({text!r})"


def _fits(picture, panel, natural_width: int | None = None) -> None:
    """An image shown at most at its natural size, inside the panel, at its aspect."""
    picture.scroll_into_view_if_needed()
    natural = picture.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    box, frame = picture.bounding_box(), panel.bounding_box()
    assert natural[0] > 0 and box["width"] <= natural[0] + 0.5, (box, natural)
    assert box["x"] >= frame["x"] - 0.5 and box["x"] + box["width"] <= frame["x"] + frame["width"] + 0.5, (box, frame)
    assert abs(box["height"] / box["width"] - natural[1] / natural[0]) < 0.03, (box, natural)
    if natural_width is not None:
        assert natural[0] == natural_width


def _set_slider(panel, label: str, value) -> None:
    """Type a value into a slider's readout, as a person can instead of dragging."""
    readout = panel.locator(".widget-slider", has_text=label).locator(".widget-readout")
    readout.click()
    readout.press("Control+a")
    readout.type(str(value))
    readout.press("Enter")


def test_chat_panel_upload_ask_watch_the_answer_stream_in(notebook):
    page = notebook("chat", [
        LLAVA + "\nslowed(model.model.language_model, 0.25)\nimage.save('photo.png')\n"
                "session = vlm.ChatSession(model, processor, settings=vlm.GenerationSettings(max_new_tokens=12))",
        "from helpers.widgets import ChatPanel\npanel = ChatPanel(session)\npanel",
        "print('TURNS', len(session.turns), [len(t.images) for t in session.turns])"])
    panel = _show_panel(page)
    with page.page.expect_file_chooser() as chooser:   # ipywidgets 8 keeps its <input type=file> off the page
        panel.locator(".widget-upload").click()
    chooser.value.set_files(str(page.server.root / "photo.png"))
    panel.locator("textarea").fill("What is in the picture?")

    def asked_above_the_answer():   # while the answer streams in, the question and its image stay in view above it
        text = panel.locator(".widget-html").first.inner_text()
        assert text.index("You: What is in the picture?") < text.index("LLaVA:"), text
        assert panel.locator(".widget-html").first.locator("img").count() == 1

    _busy_then_done(page, panel, _button(panel, "Send"), progress="LLaVA:", meanwhile=asked_above_the_answer)
    page.printed(2, r"TURNS 2 \[1, 0\]")
    history = panel.locator(".widget-html").first
    assert "You: What is in the picture?" in history.inner_text()
    thumb = history.locator("img")
    assert thumb.count() == 1
    box = thumb.bounding_box()
    assert max(box["width"], box["height"]) <= 96.5   # a thumbnail, with its token count under it
    assert re.search(r"\[image: \d+ tokens\]", history.inner_text())
    assert panel.locator("textarea").input_value() == ""   # ready for the next question
    page.shot("result")
    page.assert_clean()


def test_caption_panel_captions_a_folder_then_saves_an_edit(notebook):
    page = notebook("caption", [
        LLAVA + "\nslowed(model.model.language_model, 0.02)\nfrom pathlib import Path\nfolder = Path('photos')\n"
                "folder.mkdir()\nfor i in range(2):\n    image.rotate(90 * i).save(folder / f'photo{i}.png')",
        "from helpers.widgets import CaptionPanel\npanel = CaptionPanel(model, processor, folder=str(folder))\npanel",
        "print('CAPTION', repr((folder / 'photo0.txt').read_text()))"])
    panel = _show_panel(page)
    panel.locator("select").select_option("short")
    panel.locator("input[placeholder^='optional']").fill("sks")
    _busy_then_done(page, panel, _button(panel, "Caption"))
    pictures = panel.locator(".widget-image")
    assert pictures.count() == 2
    for i in range(2):
        _fits(pictures.nth(i), panel, natural_width=128)   # a 128 px photo: shown at 128, not stretched
    captions = panel.locator("textarea")
    assert captions.first.input_value().startswith("sks")   # the trigger word leads every caption
    captions.first.fill("sks, a photo edited by hand")
    _button(panel, "Save captions").click()
    panel.get_by_text("Saved 2 caption(s).").wait_for(timeout=30_000)
    page.printed(2, r"CAPTION 'sks, a photo edited by hand(\\n)?'")
    page.shot("result")
    page.assert_clean()


def test_reasoning_panel_shows_steps_and_answer(notebook):
    page = notebook("reasoning", [
        LLAVA + "\nslowed(model.model.language_model, 0.02)",
        "from helpers.widgets import ReasoningPanel\npanel = ReasoningPanel(model, processor, image=image)\npanel"])
    panel = _show_panel(page)
    panel.locator("textarea[placeholder='Question']").fill("How many circles are there?")
    panel.locator("textarea[placeholder^='Choices']").fill("1\n2\n3")
    _busy_then_done(page, panel, _button(panel, "Reason"), progress="working")
    assert panel.get_by_text("Answer:").count() == 1
    assert panel.locator("ol").count() == 1
    page.shot("result")
    page.assert_clean()


def test_generate_panel_progress_inside_and_the_gallery(notebook):
    page = notebook("generate", [
        SD + "\npipe = loading.load_sd('sd15', task='txt2img')\nslowed(pipe.unet, 0.5)",
        "from helpers.widgets import GeneratePanel\npanel = GeneratePanel(pipe, model_name='sd15')\npanel",
        "from helpers import read_parameters\n"
        "print('STEPS', panel.steps.value, read_parameters(panel.result.save()[0])['Steps'])"])
    panel = _show_panel(page)
    panel.locator("textarea").first.fill("a red car")
    _set_slider(panel, "Steps", 3)   # SMOKE MODE would cap the default 25 at 4
    _busy_then_done(page, panel, _button(panel, "Generate"))
    assert panel.get_by_text("seeds").count() == 1
    page.printed(2, r"STEPS 3 3")   # the slider's value is what ran, and what the PNG says
    _fits(panel.locator(".widget-image").last, panel)
    page.shot("result")
    page.assert_clean()


def test_benchmark_panel_table_plots_and_grids_fit(notebook):
    page = notebook("benchmark", [
        "from pathlib import Path\nfrom helpers.widgets import BenchmarkPanel",
        "panel = BenchmarkPanel(models=('sd15',), out=Path('bench'))\npanel"])
    panel = _show_panel(page)
    panel.locator("textarea").fill("a red apple on a table")
    _set_slider(panel, "Steps", 2)
    _busy_then_done(page, panel, _button(panel, "Run"), progress="working", timeout_s=300)
    assert panel.get_by_text("Results in").count() == 1
    assert panel.locator("table").get_by_text("sd15").count() >= 1
    pictures = panel.locator(".widget-image")
    assert pictures.count() == 3   # the speed plot, the CLIP-score plot, one grid
    for i in range(3):
        _fits(pictures.nth(i), panel)
    page.shot("result")
    page.assert_clean()


def test_inpaint_panel_paint_progress_result(notebook):
    page = notebook("inpaint", [
        SD + "\npipe = loading.load_sd('sd15-inpaint', task='inpaint')\nslowed(pipe.unet, 0.5)",
        "from helpers.widgets import InpaintPanel\npanel = InpaintPanel(pipe, image=image, model_name='sd15-inpaint')"
        "\npanel",
        "m = np.asarray(panel.mask())\nys, xs = np.nonzero(m > 127)\n"
        "print('MASK', panel.mask_source.value, m.shape, xs.min(), xs.max(), ys.min(), ys.max())"])
    panel = _show_panel(page)
    canvas = panel.locator(".helpers-mask canvas")
    canvas.wait_for(timeout=60_000)
    canvas.evaluate("c => c.scrollIntoView({block: 'center'})")   # all of it on the screen, to paint on
    box = canvas.bounding_box()
    assert box["width"] >= 384, box   # a 128 px image is enlarged to paint on (its longer side 512 px, room allowing)
    page.shot("panel")

    # paint a stroke across the middle, from 20% to 80% of the width
    y = box["y"] + box["height"] / 2
    page.page.mouse.move(box["x"] + 0.2 * box["width"], y)
    page.page.mouse.down()
    for i in range(1, 11):
        page.page.mouse.move(box["x"] + (0.2 + 0.06 * i) * box["width"], y)
    page.page.mouse.up()
    page.page.wait_for_timeout(500)
    found = page.printed(2, r"MASK (\w+) \((\d+), (\d+)\) (\d+) (\d+) (\d+) (\d+)")
    source, h, w, x0, x1, y0, y1 = found.group(1), *map(int, found.groups()[1:])
    assert (source, h, w) == ("paint", 128, 128)
    brush = 8   # the canvas's brush on a 128 px image: min(size) / 16, in the image's pixels
    assert abs(x0 - (0.2 * 128 - brush / 2)) <= 3 and abs(x1 - (0.8 * 128 + brush / 2)) <= 3
    assert abs(y0 - (64 - brush / 2)) <= 3 and abs(y1 - (64 + brush / 2)) <= 3

    panel.locator("textarea").fill("a red car")
    button = _button(panel, "Inpaint")
    button_box = button.bounding_box()
    _busy_then_done(page, panel, button)
    assert panel.get_by_text("saved").count() == 1
    bar = panel.get_by_text(BAR).first.bounding_box()
    assert 0 < bar["y"] - button_box["y"] < 200, (bar, button_box)   # the progress right under the button
    _fits(panel.locator(".widget-image").last, panel)
    page.shot("result")
    page.assert_clean()
