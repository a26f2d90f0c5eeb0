"""The InpaintPanel as a person uses it, in JupyterLab 4 + ipywidgets 8 in headless Chromium (SMOKE MODE): paint a
stroke, press Inpaint, watch the progress inside the panel, see the result image in it."""
import re

import nbformat
import pytest
from lab_fixtures import chromium, lab, screenshots  # noqa: F401 (fixtures: a conftest.py here would shadow
#                                                   tests/conftest.py, which the other tests import by name)

pytestmark = pytest.mark.browser

SETUP = """\
import time
import numpy as np
from PIL import Image
from helpers import loading
from helpers.widgets import InpaintPanel

pipe = loading.load_sd("sd15-inpaint", task="inpaint")
step = pipe.unet.forward
def slow_step(*args, **kwargs):   # the tiny model is too quick to see the progress while it runs
    time.sleep(0.5)
    return step(*args, **kwargs)
pipe.unet.forward = slow_step
image = Image.fromarray((np.random.RandomState(0).rand(128, 128, 3) * 255).astype("uint8"))"""
PANEL = "panel = InpaintPanel(pipe, image=image, model_name='sd15-inpaint')\npanel"
CHECK = """\
m = np.asarray(panel.mask())
ys, xs = np.nonzero(m > 127)
print("MASK", panel.mask_source.value, m.shape, xs.min(), xs.max(), ys.min(), ys.max())"""


def _run_cell(page, index: int) -> None:
    """Run cell `index` as a person does (click it, Shift+Enter) and wait until it has run."""
    from playwright.sync_api import expect

    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    expect(cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\d+\]"), timeout=120_000)


def test_inpaint_panel_paint_progress_result(chromium, lab, screenshots):
    base, token, root = lab
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in (SETUP, PANEL, CHECK)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "panel.ipynb")

    page = chromium.new_page(viewport={"width": 1280, "height": 1000})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{base}/lab/tree/panel.ipynb?token={token}")
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
        page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=60_000)
        _run_cell(page, 0)
        _run_cell(page, 1)
        panel = page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-OutputArea-output").first
        canvas = panel.locator(".helpers-mask canvas")
        canvas.wait_for(timeout=60_000)
        page.screenshot(path=str(screenshots / "inpaint_panel.png"), full_page=True)

        # paint a stroke across the middle, from 20% to 80% of the width
        box = canvas.bounding_box()
        y = box["y"] + box["height"] / 2
        page.mouse.move(box["x"] + 0.2 * box["width"], y)
        page.mouse.down()
        for i in range(1, 11):
            page.mouse.move(box["x"] + (0.2 + 0.06 * i) * box["width"], y)
        page.mouse.up()
        page.wait_for_timeout(500)
        _run_cell(page, 2)
        out = page.locator(".jp-Notebook .jp-Cell").nth(2).locator(".jp-OutputArea-output")
        out.wait_for(timeout=30_000)
        found = re.search(r"MASK (\w+) \((\d+), (\d+)\) (\d+) (\d+) (\d+) (\d+)", out.inner_text())
        assert found, out.inner_text()
        source, h, w, x0, x1, y0, y1 = found.group(1), *map(int, found.groups()[1:])
        assert (source, h, w) == ("paint", 128, 128)
        brush = 8   # the canvas's brush on a 128 px image: min(size) / 16
        assert abs(x0 - (0.2 * 128 - brush / 2)) <= 3 and abs(x1 - (0.8 * 128 + brush / 2)) <= 3
        assert abs(y0 - (64 - brush / 2)) <= 3 and abs(y1 - (64 + brush / 2)) <= 3

        panel.locator("textarea").fill("a red car")
        button = panel.locator("button", has_text="Inpaint")
        button.click()
        bar = panel.locator(".widget-output").get_by_text(re.compile(r"\d+/\d+\s+\["))
        bar.first.wait_for(timeout=60_000)
        seen_busy = button.is_disabled() and not re.search(r"(\d+)/\1\s", bar.first.inner_text())
        page.screenshot(path=str(screenshots / "inpaint_running.png"), full_page=True)
        panel.get_by_text("saved").wait_for(timeout=120_000)
        assert seen_busy, "no progress seen inside the panel while it ran, with the button disabled"
        assert not button.is_disabled()
        result = panel.locator(".widget-image").last
        result.scroll_into_view_if_needed()
        natural = result.evaluate("img => img.naturalWidth")   # 64: SMOKE MODE caps the size
        assert natural > 0 and result.bounding_box()["width"] <= natural + 0.5   # at most its natural size
        page.screenshot(path=str(screenshots / "inpaint_result.png"), full_page=True)
        assert page.get_by_text("Error displaying widget").count() == 0
        assert errors == []
    finally:
        page.screenshot(path=str(screenshots / "inpaint_last.png"), full_page=True)   # where it stood, also on failure
        print("console errors:", errors)
        page.close()
