"""Visual reasoning with LLaVA: step-by-step answers with the final answer separated, multiple-choice questions
(ScienceQA style) with the chosen option parsed out, and accuracy on a small evaluation set (assets/vqa)."""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import images as imaging
from . import storage
from .vlm import ChatSession, GenerationSettings

LETTERS = "ABCDEFGH"
EVAL_SET = storage.ASSETS / "vqa" / "questions.jsonl"


@dataclass
class Reasoning:
    question: str
    steps: list[str]
    answer: str
    choice: str | None = None   # the letter chosen, for multiple-choice questions (None if none could be read)
    raw: str = ""               # the model's whole reply


def build_prompt(question: str, choices: list[str] | None = None) -> str:
    """The question, its lettered options, and the instruction to reason in steps and end with 'Answer: ...'."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"The question must be a non-empty string, not {question!r}.")
    lines = [question.strip()]
    if choices:
        if not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f"Give between 2 and {len(LETTERS)} choices, not {len(choices)}.")
        lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices)]
    lines.append("Think step by step: write your reasoning as short numbered steps, then give the final answer on "
                 "its own last line as 'Answer: " + ("<letter>'." if choices else "<answer>'."))
    return "\n".join(lines)


_ANSWER = re.compile(r"^\s*(?:\*\*)?(?:final\s+)?answer(?:\*\*)?\s*[:：\-]\s*(.*)$", re.IGNORECASE)
_STEP_PREFIX = re.compile(r"^\s*(?:step\s*\d+\s*[:.)-]|\d+\s*[.)]|[-*•])\s*", re.IGNORECASE)


def parse_reasoning(raw: str) -> tuple[list[str], str]:
    """(steps, answer): the answer is the text of the last 'Answer:' line (else the last line); the steps are the
    lines before it, without their numbering."""
    lines = [line for line in raw.strip().splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        match = _ANSWER.match(lines[i])
        if match:
            answer, before = match.group(1).strip(), lines[:i]
            break
    else:
        answer, before = (lines[-1].strip(), lines[:-1]) if lines else ("", [])
    steps = [_STEP_PREFIX.sub("", line).strip() for line in before]
    return [s for s in steps if s], answer.strip().strip("*").strip()


def parse_choice(answer: str, choices: list[str]) -> str | None:
    """The letter an answer picks: "B", "(B)", "B.", "B) blue", "option B", "the answer is B", or else the text of
    exactly one choice. ("A red circle" is read by its text, not as the letter A.)"""
    letters, text = LETTERS[:len(choices)], answer.strip()
    match = (re.match(rf"\(([{letters}])\)", text, re.IGNORECASE)
             or re.match(rf"([{letters}])(?:[.):]|$)", text, re.IGNORECASE)
             or re.search(rf"\b(?:option|choice|answer is)\s*\(?([{letters}])\b", text, re.IGNORECASE))
    if match:
        return match.group(1).upper()
    named = [c.lower() for c in choices if re.search(rf"\b{re.escape(c.lower())}\b", text.lower())]
    longest = max(named, key=len, default=None)  # "a red circle" names "red" too: the longer choice wins
    if longest is None or any(n not in longest for n in named):
        return None
    return letters[[c.lower() for c in choices].index(longest)]


def reason(model, processor, image, question: str, choices: list[str] | None = None,
           max_new_tokens: int = 384) -> Reasoning:
    """Ask `question` about `image` (PIL image, path or URL) with step-by-step reasoning; greedy."""
    prompt = build_prompt(question, choices)
    session = ChatSession(model, processor, settings=GenerationSettings(max_new_tokens=max_new_tokens))
    raw = session.send(prompt, images=[image])
    steps, answer = parse_reasoning(raw)
    return Reasoning(question=question.strip(), steps=steps, answer=answer,
                     choice=parse_choice(answer, choices) if choices else None, raw=raw)


@dataclass
class EvalReport:
    correct: int = 0
    total: int = 0
    rows: list[dict] = field(default_factory=list)   # id, skill, expected, chosen, ok

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def by_skill(self) -> dict[str, float]:
        skills = {}
        for row in self.rows:
            skills.setdefault(row["skill"], []).append(row["ok"])
        return {skill: sum(oks) / len(oks) for skill, oks in sorted(skills.items())}

    def __str__(self) -> str:
        chance = sum(1 / row["n_choices"] for row in self.rows) / max(len(self.rows), 1)
        parts = ", ".join(f"{skill} {acc:.0%}" for skill, acc in self.by_skill().items())
        return (f"accuracy {self.accuracy:.0%} ({self.correct}/{self.total}; chance {chance:.0%})"
                + (f" - {parts}" if parts else ""))


def load_eval_set(path=EVAL_SET) -> list[dict]:
    path = Path(path)
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for item in items:
        item["image_path"] = path.parent / item["image"]
    return items


def evaluate(model, processor, path=EVAL_SET, limit: int | None = None, max_new_tokens: int = 384) -> EvalReport:
    """Accuracy of multiple-choice answers on the evaluation set (meaningful with real weights only)."""
    from tqdm.auto import tqdm

    report = EvalReport()
    items = load_eval_set(path)[:limit]
    for item in tqdm(items, desc="evaluating", unit="question"):
        result = reason(model, processor, imaging.open_image(item["image_path"]), item["question"], item["choices"],
                        max_new_tokens=max_new_tokens)
        ok = result.choice == item["answer"]
        report.total += 1
        report.correct += ok
        report.rows.append({"id": item["id"], "skill": item.get("skill", ""), "expected": item["answer"],
                            "chosen": result.choice, "ok": ok, "n_choices": len(item["choices"])})
    return report
