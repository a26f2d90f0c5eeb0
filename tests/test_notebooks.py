"""Notebook hygiene: committed clean, and in the anatomy of DESIGN.md. (The notebooks themselves run under nbval:
pytest collects notebooks/ with --nbval-lax, see pyproject.toml.)"""
import ast
import json
import re
from pathlib import Path

import pytest

REPO = "llava-sd-notebooks/llava-sd-notebooks"
NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_there_are_notebooks():
    assert any(p.name == "04_txt2img.ipynb" for p in NOTEBOOKS)


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.name)
def nb(request):
    return request.param, json.loads(request.param.read_text())


def test_committed_without_outputs(nb):
    path, data = nb
    dirty = [i for i, c in enumerate(code_cells(data)) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, f"{path.name}: code cells {dirty} hold outputs or execution counts; clear them before committing"
    assert "widgets" not in data["metadata"], f"{path.name}: saved widget state in its metadata"


def test_title_badge_and_t4_needs(nb):
    path, data = nb
    first = data["cells"][0]
    assert first["cell_type"] == "markdown"
    text = source(first)
    assert text.startswith("# ")
    badge = f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{path.name}"
    assert badge in text and "colab-badge.svg" in text, f"{path.name}: no Open-in-Colab badge pointing to {badge}"
    assert "T4" in text and "Time on a T4" in text, f"{path.name}: say the GPU and time it needs on a T4"


def test_setup_cell_comes_first(nb):
    path, data = nb
    setup = source(code_cells(data)[0])
    assert "import helpers as h" in setup and "h.setup()" in setup, f"{path.name}: the first code cell is the setup"
    assert "colab_setup.sh" in setup


def test_parameters_cell_is_a_form_of_literals(nb):
    path, data = nb
    cell = code_cells(data)[1]
    assert "parameters" in cell["metadata"].get("tags", []), f"{path.name}: 2nd code cell must be tagged parameters"
    lines = [line for line in source(cell).splitlines() if line.strip() and not line.startswith("# @title")]
    for line in lines:
        assert "#" in line, f"{path.name}: parameter without its comment: {line!r}"
        statement = ast.parse(line).body
        assert len(statement) == 1 and isinstance(statement[0], ast.Assign), line
        (target,) = statement[0].targets
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", target.id), f"{path.name}: {target.id} is not UPPER_SNAKE"
        ast.literal_eval(statement[0].value)  # literals only: raises on anything derived


def test_never_waits_for_input(nb):
    path, data = nb
    for cell in code_cells(data):
        assert not re.search(r"\binput\(", source(cell)), f"{path.name}: input() would hang a headless run"
