import numpy as np
import pytest
from PIL import Image

from helpers import loading, reasoning


@pytest.fixture(scope="module")
def llava():
    return loading.load_llava("llava-1.6-vicuna-7b")


def test_prompt_lists_the_choices_and_asks_for_steps():
    prompt = reasoning.build_prompt("Which shape is red?", ["circle", "square", "triangle"])
    assert prompt.splitlines()[:4] == ["Which shape is red?", "A. circle", "B. square", "C. triangle"]
    assert "numbered steps" in prompt and "'Answer: <letter>'" in prompt
    with pytest.raises(ValueError, match="between 2 and 8 choices, not 1"):
        reasoning.build_prompt("?", ["only one"])
    with pytest.raises(ValueError, match="The question must be a non-empty string"):
        reasoning.build_prompt(" ", None)


@pytest.mark.parametrize("raw, steps, answer", [
    ("1. There are two shapes.\nStep 2: one is red.\n- So the red one is left.\nAnswer: B",
     ["There are two shapes.", "one is red.", "So the red one is left."], "B"),
    ("The sky scatters blue light.\n**Final answer:** (C) green", ["The sky scatters blue light."], "(C) green"),
    ("Answer: 4\nextra words after", [], "4"),  # text after the answer line is neither step nor answer
    ("no answer line\nthe last line", ["no answer line"], "the last line"),
    ("", [], ""),
])
def test_parse_reasoning(raw, steps, answer):
    assert reasoning.parse_reasoning(raw) == (steps, answer)


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"), ("(c)", "C"), ("B. blue", "B"), ("D) a red circle", "D"), ("option A", "A"),
    ("The answer is B.", "B"), ("a red circle", "D"), ("blue", "B"), ("red or blue", None), ("I cannot tell", None)])
def test_parse_choice(answer, expected):
    assert reasoning.parse_choice(answer, ["red", "blue", "green", "a red circle"]) == expected


def test_reason_separates_steps_and_answer(llava):
    image = Image.fromarray((np.random.RandomState(0).rand(48, 64, 3) * 255).astype("uint8"))
    result = reasoning.reason(*llava, image, "Which color is the circle?", ["red", "blue"], max_new_tokens=16)
    assert result.raw and result.question == "Which color is the circle?"
    steps, answer = reasoning.parse_reasoning(result.raw)
    assert (result.steps, result.answer) == (steps, answer)
    assert result.choice in (None, "A", "B")


def test_evaluate_runs_on_the_shipped_set(llava):
    report = reasoning.evaluate(*llava, limit=3, max_new_tokens=8)
    assert report.total == 3 and 0 <= report.correct <= 3 and len(report.rows) == 3
    assert str(report).startswith(f"accuracy {report.accuracy:.0%} ({report.correct}/3; chance ")


def test_evaluate_scores_answers(monkeypatch, llava):
    """With the model's answers fixed, accuracy counts exactly the right ones."""
    items = reasoning.load_eval_set()[:4]
    answers = iter([items[0]["answer"], "Z", items[2]["answer"], "Z"])
    monkeypatch.setattr(reasoning, "reason", lambda *a, **k: reasoning.Reasoning("q", [], "", next(answers)))
    report = reasoning.evaluate(*llava, limit=4)
    assert (report.correct, report.total) == (2, 4) and report.accuracy == 0.5
