"""Draws the small visual-reasoning set in this folder: images/*.png and questions.jsonl (CC0-1.0, made here).

    python assets/vqa/make_vqa_set.py

Each scene is a list of shapes (kind, colour, centre, size); the script draws it and computes every answer from the
same list, so the answers are right by construction. Seeded: the same Pillow and numpy give the same files.
"""
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SEED = 0
SIZE = 256          # image side in pixels
LETTERS = "ABCD"

# The palette: index -> (name, RGB). Images are saved in palette mode with exactly these colours (a few KB each).
COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (90, 90, 90), "red": (220, 30, 30),
           "blue": (30, 70, 220), "green": (30, 160, 60), "yellow": (240, 200, 20), "purple": (140, 50, 170),
           "orange": (245, 130, 20)}
INDEX = {name: i for i, name in enumerate(COLOURS)}
HUES = ["red", "blue", "green", "yellow", "purple", "orange"]   # the colours shapes are painted in
KINDS = ["circle", "square", "triangle"]


def shape(kind, colour, x, y, r, check=True):
    """check=False for decoration that later shapes may cover (a chart's axes, a traffic light's housing)."""
    return {"kind": kind, "colour": colour, "x": x, "y": y, "r": r, "check": check}


def draw_shape(draw, s):
    x, y, r, fill = s["x"], s["y"], s["r"], INDEX[s["colour"]]
    if s["kind"] == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif s["kind"] == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif s["kind"] == "triangle":   # pointing up; (x, y) lies inside it
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    elif s["kind"] == "rect":       # bars and traffic-light housing: r is (half width, half height)
        draw.rectangle([x - r[0], y - r[1], x + r[0], y + r[1]], fill=fill)
    else:
        raise ValueError(f"Unknown shape kind {s['kind']!r}.")


def render(shapes) -> Image.Image:
    image = Image.new("P", (SIZE, SIZE), INDEX["white"])
    image.putpalette([c for rgb in COLOURS.values() for c in rgb])
    draw = ImageDraw.Draw(image)
    for s in shapes:
        draw_shape(draw, s)
    pixels = np.asarray(image)
    # every shape is visible where the answers assume it is: its centre shows its colour
    for s in filter(lambda s: s["check"], shapes):
        assert pixels[s["y"], s["x"]] == INDEX[s["colour"]], s
    return image


def scatter(rng, specs, r=(18, 24)):
    """Shapes (kind, colour) placed in distinct cells of a 4x4 grid, jittered: they never touch."""
    cell = SIZE // 4
    cells = rng.sample(range(16), len(specs))
    return [shape(kind, colour, c % 4 * cell + cell // 2 + rng.randint(-6, 6),
                  c // 4 * cell + cell // 2 + rng.randint(-6, 6), rng.randint(*r))
            for (kind, colour), c in zip(specs, cells)]


def question(rng, qid, image, text, correct, wrong, skill):
    choices = [correct] + list(wrong)
    assert 3 <= len(choices) <= 4 and len(set(choices)) == len(choices), choices
    rng.shuffle(choices)
    return {"id": qid, "image": f"images/{image}.png", "question": text, "choices": choices,
            "answer": LETTERS[choices.index(correct)], "skill": skill}


def others(rng, pool, exclude, n):
    return rng.sample([p for p in pool if p not in exclude], n)


def count_wrong(rng, n):
    return rng.sample([str(k) for k in range(1, 7) if k != n], 3)


def build(rng):
    """[(image name, shapes, [question, ...])]"""
    scenes = []

    # counting: circles only; squares among other shapes; triangles; shapes of one colour
    s = scatter(rng, [("circle", rng.choice(HUES)) for _ in range(3)])
    n = sum(x["kind"] == "circle" for x in s)
    scenes.append(("count_circles", s, [question(rng, "count_circles", "count_circles",
                   "How many circles are in the image?", str(n), count_wrong(rng, n), "counting")]))

    s = scatter(rng, [("square", rng.choice(HUES)) for _ in range(4)] + [("triangle", "green"), ("circle", "red")])
    n = sum(x["kind"] == "square" for x in s)
    scenes.append(("count_squares", s, [question(rng, "count_squares", "count_squares",
                   "How many squares are in the image?", str(n), count_wrong(rng, n), "counting")]))

    s = scatter(rng, [("triangle", "orange")] * 5)
    n = sum(x["kind"] == "triangle" for x in s)
    scenes.append(("count_triangles", s, [question(rng, "count_triangles", "count_triangles",
                   "How many triangles are in the image?", str(n), count_wrong(rng, n), "counting")]))

    s = scatter(rng, [(rng.choice(KINDS), "blue") for _ in range(2)]
                + [(rng.choice(KINDS), "yellow") for _ in range(3)])
    n = sum(x["colour"] == "blue" for x in s)
    scenes.append(("count_blue", s, [question(rng, "count_blue", "count_blue",
                   "How many blue shapes are in the image?", str(n), count_wrong(rng, n), "counting")]))

    # colour: the triangle among other shapes; the traffic light's lit lamp
    colours = rng.sample(HUES, 3)
    s = scatter(rng, list(zip(KINDS, colours)))
    c = next(x["colour"] for x in s if x["kind"] == "triangle")
    scenes.append(("colour_triangle", s, [question(rng, "colour_triangle", "colour_triangle",
                   "What colour is the triangle?", c, [x["colour"] for x in s if x["kind"] != "triangle"]
                   + others(rng, HUES, colours, 1), "color")]))

    lit = rng.choice(["red", "yellow", "green"])
    s = [shape("rect", "black", 128, 128, (34, 100), check=False)]
    s += [shape("circle", colour if colour == lit else "grey", 128, y, 26)
          for colour, y in (("red", 60), ("yellow", 128), ("green", 196))]
    scenes.append(("traffic_light", s, [question(rng, "traffic_light", "traffic_light",
                   "Which lamp of the traffic light is lit?", lit, [c for c in ("red", "yellow", "green") if c != lit],
                   "color")]))

    # spatial: left/right on one row; above/below in one column; the middle of a row of three
    kinds, colours = rng.sample(KINDS, 2), rng.sample(HUES, 2)
    y = rng.randint(80, 176)
    left, right = (shape(kinds[0], colours[0], rng.randint(40, 80), y + rng.randint(-8, 8), 26),
                   shape(kinds[1], colours[1], rng.randint(176, 216), y + rng.randint(-8, 8), 26))
    s = [left, right] if rng.random() < 0.5 else [right, left]
    a, b = s   # the question asks where a is, relative to b
    where = "left" if a["x"] < b["x"] else "right"
    scenes.append(("left_right", s, [question(rng, "left_right", "left_right",
                   f"Is the {a['colour']} {a['kind']} to the left of, to the right of, above or below the "
                   f"{b['colour']} {b['kind']}?", where, [w for w in ("left", "right", "above", "below") if w != where],
                   "spatial")]))

    kinds, colours = rng.sample(KINDS, 3), rng.sample(HUES, 3)
    x = rng.randint(70, 120)
    top, bottom = shape(kinds[0], colours[0], x, 60, 26), shape(kinds[1], colours[1], x, 190, 26)
    side = shape(kinds[2], colours[2], 200, rng.randint(60, 190), 22)
    s = [top, bottom, side]
    above = next(t for t in s if t is not bottom and abs(t["x"] - bottom["x"]) < 30 and t["y"] < bottom["y"])
    name = f"the {above['colour']} {above['kind']}"
    scenes.append(("above_below", s, [question(rng, "above_below", "above_below",
                   f"What is directly above the {bottom['colour']} {bottom['kind']}?", name,
                   [f"the {side['colour']} {side['kind']}", f"the {others(rng, HUES, colours, 1)[0]} {kinds[0]}",
                    "nothing"], "spatial")]))

    kinds, colours = rng.sample(KINDS, 3), rng.sample(HUES, 3)
    s = [shape(k, c, x, 128, 28) for k, c, x in zip(kinds, colours, (48, 128, 208))]
    mid = sorted(s, key=lambda t: t["x"])[1]
    scenes.append(("middle", s, [question(rng, "middle", "middle",
                   "Which shape is in the middle of the row?", f"the {mid['colour']} {mid['kind']}",
                   [f"the {t['colour']} {t['kind']}" for t in s if t is not mid]
                   + [f"the {others(rng, HUES, colours, 1)[0]} {mid['kind']}"], "spatial")]))

    # comparison: sizes of two circles; numbers of shapes of two colours
    colours, radii = rng.sample(HUES, 2), [rng.randint(16, 24), rng.randint(44, 56)]
    rng.shuffle(radii)
    s = [shape("circle", colours[0], 72, 128, radii[0]), shape("circle", colours[1], 184, 128, radii[1])]
    big = max(s, key=lambda t: t["r"])
    scenes.append(("bigger_circle", s, [question(rng, "bigger_circle", "bigger_circle",
                   "Which circle is bigger?", f"the {big['colour']} one",
                   [f"the {t['colour']} one" for t in s if t is not big] + ["they are the same size"],
                   "comparison")]))

    n_red, n_blue = rng.sample([2, 3, 4, 5], 2)
    s = scatter(rng, [(rng.choice(KINDS), "red") for _ in range(n_red)]
                + [(rng.choice(KINDS), "blue") for _ in range(n_blue)])
    reds, blues = (sum(t["colour"] == c for t in s) for c in ("red", "blue"))
    more = "more red shapes" if reds > blues else "more blue shapes"
    scenes.append(("more_red_or_blue", s, [question(rng, "more_red_or_blue", "more_red_or_blue",
                   "Are there more red shapes or more blue shapes?", more,
                   [m for m in ("more red shapes", "more blue shapes") if m != more] + ["the same number"],
                   "comparison")]))

    # chart: three bars on a baseline, distinct heights
    colours = rng.sample(HUES, 3)
    heights = rng.sample(range(40, 190, 30), 3)   # at least 30 px apart
    s = [shape("rect", "black", 128, 222, (110, 2), False), shape("rect", "black", 20, 120, (2, 104), False)]  # axes
    bars = [shape("rect", c, x, 220 - h // 2, (22, h // 2)) for c, x, h in zip(colours, (68, 128, 188), heights)]
    s += bars
    tall = colours[heights.index(max(heights))]
    short = colours[heights.index(min(heights))]
    scenes.append(("bar_chart", s, [
        question(rng, "bar_tallest", "bar_chart", "Which bar in the chart is the tallest?", f"the {tall} bar",
                 [f"the {c} bar" for c in colours if c != tall], "chart"),
        question(rng, "bar_shortest", "bar_chart", "Which bar in the chart is the shortest?", f"the {short} bar",
                 [f"the {c} bar" for c in colours if c != short], "chart")]))
    return scenes


def main():
    rng = random.Random(SEED)
    (HERE / "images").mkdir(exist_ok=True)
    lines = []
    for name, shapes, questions in build(rng):
        render(shapes).save(HERE / "images" / f"{name}.png", optimize=True)
        lines += [json.dumps(q) for q in questions]
    (HERE / "questions.jsonl").write_text("\n".join(lines) + "\n")
    total = sum(f.stat().st_size for f in (HERE / "images").glob("*.png"))
    print(f"{len(lines)} questions on {len(list((HERE / 'images').glob('*.png')))} images ({total / 1e3:.1f} KB) "
          f"in {HERE}")


if __name__ == "__main__":
    main()
