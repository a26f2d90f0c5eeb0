"""bench/train.py writes a well-formed result file: the tiny sentence, the header, one row a setting with positive
figures that agree with each other, JSON rows, the command; settings this machine cannot run are refused early."""
import json

import pytest

import conftest


def load_bench():
    return conftest.load_bench("train")


def parse_rows(bench, text):
    header = [h.strip() for h in bench.HEADER.split("|")[1:-1]]
    return [dict(zip(header, (c.strip() for c in line.split("|")[1:-1])))
            for line in text.splitlines() if line.startswith(("| dreambooth", "| lora"))]


def test_bench_writes_table_and_json(tmp_path, monkeypatch):
    monkeypatch.setenv("HELPERS_TINY", "1")
    import torch

    bench, out, threads = load_bench(), tmp_path / "train.md", torch.get_num_threads()
    bench.main(["--kinds", "dreambooth", "--batch-sizes", "1", "--checkpointing", "on", "--cache-latents", "on",
                "--steps", "4", "--threads", "1", "--out", str(out)])
    assert torch.get_num_threads() == threads  # --threads holds for the run only
    text = out.read_text()
    assert bench.TINY_SENTENCE in text and bench.HEADER in text
    assert "SMOKE MODE caps the work at 10 steps and 64 px (asked: 4 steps, 512 px)" in text
    assert "python bench/train.py --kinds dreambooth" in text and "torch threads 1" in text
    rows = parse_rows(bench, text)
    assert len(rows) == 1
    row = rows[0]
    assert (row["kind"], row["batch"], row["checkpointing"], row["cache latents"], row["optimizer"]) == \
        ("dreambooth", "1", "on", "on", "adamw")
    assert (row["precision"], row["steps"], row["size"], row["peak CUDA MiB"]) == ("no", "4", "64x64", "-")
    for column in ("steps/s", "s/step", "noise ms", "images/s", "run s", "peak RSS MiB"):
        assert float(row[column]) > 0, column
    records = [json.loads(line) for line in text.splitlines() if line.startswith("    {")]
    assert len(records) == 1
    record = records[0]
    assert record["tiny"] and record["kind"] == "dreambooth" and record["steps"] == 4 and record["size"] == 64
    assert record["error"] is None and record["peak_cuda_mib"] is None
    assert abs(record["steps_per_s"] - 1 / record["s_per_step"]) < 0.01 * record["steps_per_s"]
    assert record["run_s"] > 3 * record["s_per_step"]  # the whole call holds at least the three timed steps


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


CPU_ONLY = pytest.mark.skipif(_on_cuda(), reason="refused only where there is no CUDA GPU")


@pytest.mark.parametrize("args, message", [
    pytest.param(["--optimizers", "adamw8bit"], "needs a CUDA GPU", marks=CPU_ONLY),
    pytest.param(["--memory-fraction", "0.19"], "no CUDA GPU", marks=CPU_ONLY),
    (["--steps", "2"], "at least 3"),
    (["--batch-sizes", "0"], "positive integers"),
])
def test_bench_refuses_what_cannot_run_here(tmp_path, args, message):
    bench, out = load_bench(), tmp_path / "train.md"
    with pytest.raises(ValueError, match=message):
        bench.main([*args, "--out", str(out)])
    assert not out.exists()
