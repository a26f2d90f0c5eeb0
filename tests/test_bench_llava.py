"""bench/llava.py writes a well-formed result file; assets/vqa/questions.jsonl is a valid question set."""
import importlib.util
import json
import re
from pathlib import Path

from PIL import Image

import conftest

ROOT = Path(__file__).resolve().parent.parent
VQA = ROOT / "assets" / "vqa"


def load_bench():
    return conftest.load_bench("llava")


def test_bench_writes_table_and_json(tmp_path, monkeypatch):
    monkeypatch.setenv("HELPERS_TINY", "1")
    bench, out = load_bench(), tmp_path / "llava.md"
    bench.main(["--quantization", "none", "--repeats", "1", "--new-tokens", "2", "--out", str(out)])
    bench.main(["--quantization", "8bit", "--repeats", "1", "--new-tokens", "2", "--out", str(out), "--append"])
    text = out.read_text()
    assert bench.TINY_SENTENCE in text and bench.HEADER in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| llava")]
    assert [r[1].strip() for r in rows] == ["none", "8bit"]
    header = [h.strip() for h in bench.HEADER.split("|")[1:-1]]
    for row in rows:
        cells = dict(zip(header, (c.strip() for c in row)))
        assert cells["new tokens"] == "2" and float(cells["decode tok/s"]) > 0 and float(cells["peak RSS MiB"]) > 0
    records = [json.loads(line) for line in text.splitlines() if line.startswith("    {")]
    assert [r["quantization"] for r in records] == ["none", "8bit"]
    assert all(r["decode_tok_s"] > 0 and r["first_token_s"] > 0 and r["tiny"] for r in records)
    assert re.search(r"python bench/llava\.py --quantization 8bit .*--append", records[1]["command"])


def test_vqa_questions_are_well_formed():
    lines = (VQA / "questions.jsonl").read_text().splitlines()
    questions = [json.loads(line) for line in lines]
    assert len(questions) >= 10
    assert len({q["id"] for q in questions}) == len(questions)
    for q in questions:
        assert set(q) == {"id", "image", "question", "choices", "answer", "skill"}, q["id"]
        with Image.open(VQA / q["image"]) as image:
            image.load()
            assert max(image.size) <= 256
        assert 3 <= len(q["choices"]) <= 4 and len(set(q["choices"])) == len(q["choices"]), q["id"]
        assert q["answer"] in "ABCD"[:len(q["choices"])], q["id"]
        assert q["skill"] in ("counting", "color", "spatial", "comparison", "chart"), q["id"]
    assert {q["skill"] for q in questions} == {"counting", "color", "spatial", "comparison", "chart"}
    assert sum(f.stat().st_size for f in (VQA / "images").glob("*.png")) < 100_000


def test_vqa_questions_are_those_the_script_computes():
    import random

    spec = importlib.util.spec_from_file_location("make_vqa_set", VQA / "make_vqa_set.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    computed = [q for _, _, qs in script.build(random.Random(script.SEED)) for q in qs]
    assert computed == [json.loads(line) for line in (VQA / "questions.jsonl").read_text().splitlines()]
