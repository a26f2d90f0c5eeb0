"""A mask you paint: an anywidget canvas over the image (brush, eraser, brush size, undo, clear, invert, show/hide).

The mask comes back to Python as a base64 PNG string in the `mask` traitlet (white = repaint, on black), not as binary
buffers, which Colab's widget manager mishandles (colab-cdn-widget-manager #8). anywidget turns on Colab's custom
widget manager itself. `mask_image()` decodes it to a mode "L" image the size of the source image, through the same
masks.load_mask() as an uploaded mask. Without anywidget, available() is False and the panels keep upload and shapes.
"""
import base64
import html
import importlib.util
import io

import traitlets

try:
    from anywidget import AnyWidget as _Base
except ImportError:   # painting needs anywidget (Colab has it); InpaintPanel says so and keeps uploads and shapes
    _Base = None

UNAVAILABLE = ("Painting a mask needs anywidget (pip install anywidget; Colab has it). Upload a mask or use the "
               "shape sliders below.")
NO_CANVAS = ("If no canvas shows above, this page cannot show custom widgets: choose 'upload' or 'shape' "
             "under Mask from.")


def available() -> bool:
    """Whether the paint canvas can be built here (anywidget installed)."""
    return _Base is not None and importlib.util.find_spec("anywidget") is not None


DISPLAY = 512   # the canvas's longer side on the page, in CSS pixels

_ESM = r"""
const DISPLAY = %d;
function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "helpers-mask";
  const bar = document.createElement("div");
  bar.className = "helpers-mask-bar";
  const button = (label, title) => {
    const b = document.createElement("button");
    b.textContent = label; b.title = title; b.type = "button";
    bar.appendChild(b);
    return b;
  };
  const brush = button("Brush", "paint the area to repaint");
  const eraser = button("Eraser", "take paint away");
  const sizeLabel = document.createElement("label");
  sizeLabel.textContent = "Size ";
  const size = document.createElement("input");
  size.type = "range"; size.min = 1; size.max = 256;
  const sizeValue = document.createElement("span");
  sizeLabel.append(size, sizeValue);
  bar.appendChild(sizeLabel);
  const undo = button("Undo", "undo the last change");
  const clear = button("Clear", "remove all paint");
  const invert = button("Invert", "paint what is not painted, and the other way round");
  const show = button("Hide mask", "show or hide the paint");
  const stage = document.createElement("div");
  stage.className = "helpers-mask-stage";
  const img = document.createElement("img");
  img.draggable = false;
  const canvas = document.createElement("canvas");
  stage.append(img, canvas);
  root.append(bar, stage);
  el.appendChild(root);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  let history = [], drawing = false, last = null, sent = null;

  function layout() {
    canvas.width = model.get("image_width"); canvas.height = model.get("image_height");
    // shown with its longer side DISPLAY px, a small image enlarged to paint on and a large one fitted (the canvas
    // keeps the image's own pixels); CSS max-width keeps it inside the panel
    const scale = DISPLAY / Math.max(canvas.width, canvas.height, 1);
    stage.style.width = Math.round(canvas.width * scale) + "px";
    history = [];
  }
  function tools() {
    const tool = model.get("tool");
    brush.classList.toggle("active", tool === "brush");
    eraser.classList.toggle("active", tool === "eraser");
    size.value = model.get("brush_size");
    sizeValue.textContent = " " + model.get("brush_size") + " px";
    canvas.style.visibility = model.get("show_mask") ? "visible" : "hidden";
    show.textContent = model.get("show_mask") ? "Hide mask" : "Show mask";
  }
  function exportMask() {   // white where painted, on black, opaque: read as luminance by masks.load_mask
    const w = canvas.width, h = canvas.height;
    const white = document.createElement("canvas"); white.width = w; white.height = h;
    const wc = white.getContext("2d");
    wc.drawImage(canvas, 0, 0);
    wc.globalCompositeOperation = "source-in"; wc.fillStyle = "#fff"; wc.fillRect(0, 0, w, h);
    const out = document.createElement("canvas"); out.width = w; out.height = h;
    const oc = out.getContext("2d");
    oc.fillStyle = "#000"; oc.fillRect(0, 0, w, h); oc.drawImage(white, 0, 0);
    return out.toDataURL("image/png").split(",")[1];
  }
  function send() {
    sent = exportMask();
    model.set("mask", sent);
    model.save_changes();
  }
  function remember() {
    history.push(ctx.getImageData(0, 0, canvas.width, canvas.height));
    if (history.length > 30) history.shift();
  }
  function loadMask(b64) {   // a mask set from Python (cleared, inverted, a new image): white -> paint
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!b64) return;
    const im = new Image();
    im.onload = () => {
      ctx.drawImage(im, 0, 0, canvas.width, canvas.height);
      const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
      const p = data.data;
      for (let i = 0; i < p.length; i += 4) { const a = p[i]; p[i] = 255; p[i + 1] = 0; p[i + 2] = 0; p[i + 3] = a; }
      ctx.putImageData(data, 0, 0);
    };
    im.src = "data:image/png;base64," + b64;
  }
  function point(e) {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  }
  function stroke(from, to) {
    ctx.globalCompositeOperation = model.get("tool") === "eraser" ? "destination-out" : "source-over";
    ctx.strokeStyle = "rgb(255,0,0)"; ctx.lineCap = "round"; ctx.lineJoin = "round";
    ctx.lineWidth = model.get("brush_size");
    ctx.beginPath(); ctx.moveTo(from[0], from[1]); ctx.lineTo(to[0], to[1]); ctx.stroke();
    ctx.globalCompositeOperation = "source-over";
  }
  canvas.addEventListener("pointerdown", (e) => {
    if (!model.get("show_mask")) return;
    e.preventDefault();
    canvas.setPointerCapture(e.pointerId);
    remember();
    drawing = true; last = point(e);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const p = point(e);
    stroke(last, p); last = p;
  });
  const end = () => { if (drawing) { drawing = false; send(); } };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  const setTrait = (name, value) => { model.set(name, value); model.save_changes(); };
  brush.addEventListener("click", () => setTrait("tool", "brush"));
  eraser.addEventListener("click", () => setTrait("tool", "eraser"));
  size.addEventListener("input", () => setTrait("brush_size", Number(size.value)));
  show.addEventListener("click", () => setTrait("show_mask", !model.get("show_mask")));
  undo.addEventListener("click", () => { if (history.length) { ctx.putImageData(history.pop(), 0, 0); send(); } });
  clear.addEventListener("click", () => { remember(); ctx.clearRect(0, 0, canvas.width, canvas.height); send(); });
  invert.addEventListener("click", () => {
    remember();
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const p = data.data;
    for (let i = 0; i < p.length; i += 4) { p[i] = 255; p[i + 1] = 0; p[i + 2] = 0; p[i + 3] = 255 - p[i + 3]; }
    ctx.putImageData(data, 0, 0);
    send();
  });
  model.on("change:image", () => { img.src = model.get("image"); });
  model.on("change:image_width change:image_height", () => { layout(); loadMask(model.get("mask")); });
  model.on("change:tool change:brush_size change:show_mask", tools);
  model.on("change:mask", () => { const v = model.get("mask"); if (v !== sent) { history = []; loadMask(v); } });
  img.src = model.get("image");
  layout(); tools(); loadMask(model.get("mask")); sent = model.get("mask");
  model.set("ready", true);
  model.save_changes();
}
export default { render };
""" % DISPLAY

_CSS = """
.helpers-mask-bar { display: flex; flex-wrap: wrap; gap: 4px; align-items: center; margin-bottom: 4px; }
.helpers-mask-bar button { padding: 2px 10px; border: 1px solid #999; border-radius: 3px; background: #f5f5f5;
  cursor: pointer; }
.helpers-mask-bar button.active { background: #1976d2; color: #fff; border-color: #1976d2; }
.helpers-mask-bar label { margin: 0 6px; display: flex; align-items: center; gap: 4px; }
.helpers-mask-bar input[type=range] { width: 140px; }
.helpers-mask-stage { position: relative; max-width: 100%; line-height: 0; }
.helpers-mask-stage img { width: 100%; height: auto; display: block; user-select: none; }
.helpers-mask-stage canvas { position: absolute; left: 0; top: 0; width: 100%; height: 100%; opacity: 0.5;
  cursor: crosshair; touch-action: none; }
"""


class MaskCanvas(_Base or object):
    """Paint a mask over `image` (a PIL image). The painted mask is `mask` (base64 PNG, white = repaint) and
    mask_image() (a mode "L" image of the image's size). Setting `mask` from Python redraws the canvas."""

    _esm = _ESM
    _css = _CSS
    image = traitlets.Unicode("").tag(sync=True)          # the picture under the paint, as a data URL
    image_width = traitlets.Int(0).tag(sync=True)
    image_height = traitlets.Int(0).tag(sync=True)
    mask = traitlets.Unicode("").tag(sync=True)           # base64 PNG (no data: prefix); "" = nothing painted
    tool = traitlets.Unicode("brush").tag(sync=True)      # "brush" or "eraser"
    brush_size = traitlets.Int(32).tag(sync=True)         # in image pixels
    show_mask = traitlets.Bool(True).tag(sync=True)
    ready = traitlets.Bool(False).tag(sync=True)          # set by the page once the canvas has rendered

    def __init__(self, image=None, **kwargs):
        if _Base is None:
            raise ImportError(UNAVAILABLE)
        super().__init__(**kwargs)
        if image is not None:
            self.set_image(image)

    def set_image(self, image) -> None:
        """Show `image` under the canvas and start with nothing painted; the brush scales with the image."""
        picture = image.convert("RGB")
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)   # only what is shown; the mask keeps the image's own size
        with self.hold_sync():
            self.mask = ""
            self.image = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
            self.image_width, self.image_height = picture.size
            self.brush_size = max(4, round(min(picture.size) / 16))

    def mask_image(self, size=None):
        """The painted mask as a mode "L" image of `size` (default: the image's), black where nothing is painted."""
        from PIL import Image, UnidentifiedImageError

        from . import masks

        size = size or ((self.image_width, self.image_height) if self.image_width else None)
        if size is None:
            raise ValueError("The canvas has no image yet: call set_image(image) first.")
        if not self.mask:
            return Image.new("L", tuple(size), 0)
        try:
            painted = Image.open(io.BytesIO(base64.b64decode(self.mask.split(",")[-1], validate=True)))
            painted.load()
        except (ValueError, OSError, UnidentifiedImageError) as e:
            raise ValueError(f"The painted mask is not a base64 PNG ({e}). Clear the canvas and paint again.") from e
        return masks.load_mask(painted, size=tuple(size))

    def clear(self) -> None:
        """Remove all paint."""
        self.mask = ""

    def invert(self) -> None:
        """Paint what is not painted, and the other way round."""
        from . import masks

        buffer = io.BytesIO()
        masks.invert(self.mask_image()).save(buffer, format="PNG")
        self.mask = base64.b64encode(buffer.getvalue()).decode()


def fallback_note(board):
    """A line under the canvas that says what to do where the page cannot show it; gone once the canvas renders."""
    import ipywidgets as w

    note = w.HTML("" if board.ready else f"<p style='color:#666'>{html.escape(NO_CANVAS)}</p>")
    board.observe(lambda change: setattr(note, "value", "") if change["new"] else None, names="ready")
    return note
