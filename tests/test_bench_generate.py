"""bench/generate.py writes a well-formed result file: the tiny sentence, the header, positive numbers, JSON rows."""
import json
from pathlib import Path

import conftest

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    return conftest.load_bench("generate")


def test_bench_writes_table_and_json(tmp_path, monkeypatch):
    monkeypatch.setenv("HELPERS_TINY", "1")
    bench, out = load_bench(), tmp_path / "generate.md"
    bench.main(["--models", "sd15", "--samplers", "Euler a", "--repeats", "1", "--out", str(out)])
    text = out.read_text()
    assert bench.TINY_SENTENCE in text and bench.HEADER in text
    assert "SMOKE MODE caps the work at 4 steps and 64 px (asked: 25 steps, 512 px)" in text
    header = [h.strip() for h in bench.HEADER.split("|")[1:-1]]
    rows = [dict(zip(header, (c.strip() for c in line.split("|")[1:-1])))
            for line in text.splitlines() if line.startswith("| sd15")]
    assert len(rows) == 1
    row = rows[0]
    assert (row["sampler"], row["steps"], row["size"], row["route"]) == ("Euler a", "4", "64x64", "cpu")
    for column in ("load s", "generate s/img", "generate it/s", "bare s/img", "bare it/s", "peak RSS MiB"):
        assert float(row[column]) > 0, column
    float(row["overhead ms"]), float(row["overhead %"])  # numbers, of either sign
    records = [json.loads(line) for line in text.splitlines() if line.startswith("    {")]
    assert len(records) == 1
    record = records[0]
    assert record["tiny"] and record["model"] == "sd15" and record["steps"] == 4 and record["size"] == 64
    assert record["asked_steps"] == 25 and record["asked_size"] == 512
    assert record["generate_s"] > 0 and record["bare_s"] > 0 and record["load_s"] > 0
    assert abs(record["generate_it_s"] - 4 / record["generate_s"]) < 0.01 * record["generate_it_s"]
    assert record["noise_ms"] is None  # one repeat: no noise estimate
    assert "python bench/generate.py --models sd15" in text


def test_the_fast_bench_interleaves_plain_and_fast_and_writes_the_speed_up(tmp_path, monkeypatch):
    monkeypatch.setenv("HELPERS_TINY", "1")
    bench, out = conftest.load_bench("fast"), tmp_path / "fast.md"
    [record] = bench.main(["--models", "sd15", "--repeats", "2", "--out", str(out)])
    text = out.read_text()
    assert bench.TINY_SENTENCE in text and bench.HEADER in text and "python bench/fast.py --models sd15" in text
    assert record["plain_s"] > 0 and record["fast_s"] > 0
    assert abs(record["speed_up"] - record["plain_s"] / record["fast_s"]) < 0.01 * record["speed_up"]
    assert "fused QKV" in record["fast_path"] and record["image_diff"] < 2   # the same image within fp rounding
    assert record["route"] == "cpu" and record["steps"] == 4 and record["size"] == 64
