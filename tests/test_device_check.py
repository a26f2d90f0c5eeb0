"""bench/device_check.py --dry-run: the whole device script on the CPU with the tiny models (builds, one child process
a part, the results page), and its failures as rows: a part that raises, one that ends without a result, one past its
time limit, one the budget leaves out; an unknown part name is refused before anything runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import conftest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "device_check.py"


def run(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def page(path: Path) -> tuple[str, dict, list]:
    """(text, {part: [table cells of each of its rows]}, JSON records) of a results page."""
    text = path.read_text()
    header = [h.strip() for h in conftest.load_bench("device_check").HEADER.split("|")[1:-1]]
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| part "):
            cells = dict(zip(header, (c.strip() for c in line.split("|")[1:-1])))
            rows.setdefault(cells["part"], []).append(cells)
    return text, rows, [json.loads(line) for line in text.splitlines() if line.startswith("    {")]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device") / "gpu_dry-run.md"
    done = run("--dry-run", "--only", "sd15,train-sd15,flux-schnell,llava", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return page(out)


def test_dry_run_writes_every_part_as_a_row(dry_run):
    text, rows, records = dry_run
    bench = conftest.load_bench("device_check")
    assert bench.DRY_SENTENCE in text and bench.HEADER in text
    assert "python bench/device_check.py --dry-run --only sd15,train-sd15,flux-schnell,llava" in text
    assert list(rows) == ["sd15", "train-sd15", "flux-schnell", "llava"]
    assert all(cells["status"].startswith("ok") for part in rows.values() for cells in part)
    for r in records:
        assert r["tiny"] and r["status"] == "ok"
        for key in ("speed", "first_s", "peak_rss_gib", "part_s", "planner_vram_gib"):
            assert r[key] > 0, (r["part"], key, r[key])


def test_dry_run_measures_what_each_kind_promises(dry_run):
    _, rows, records = dry_run
    by_part = {}
    for r in records:
        by_part.setdefault(r["part"], []).append(r)
    sd15 = by_part["sd15"]
    assert [r["arm"].split(" ")[0] for r in sd15] == ["plain", "fast"]
    assert "fused QKV" in sd15[1]["arm"] and sd15[1]["image_diff"] < 2   # the fast path paints the same image
    assert all(r["unit"] == "it/s" and r["s_image"] > 0 and r["load_s"] > 0 and r["planner_ram_gib"] > 0
               for r in sd15)
    flux = by_part["flux-schnell"]
    assert len(flux) == 1 and flux[0]["quantization"] == "4bit" and flux[0]["s_image"] > 0
    train = by_part["train-sd15"]
    assert len(train) == 1 and train[0]["unit"] == "steps/s"
    trained = train[0]["lora_trained"]   # every LoRA projection was in the forward pass and moved
    assert set(trained) == {"to_q", "to_k", "to_v", "to_out"} and all(m == t > 0 for m, t in trained.values())
    llava = by_part["llava"]
    assert [r["arm"] for r in llava] == ["image budget low", "image budget medium", "image budget high"]
    tokens = [r["prompt_tokens"] for r in llava]
    assert tokens == sorted(tokens) and tokens[0] < tokens[-1]   # a lower budget, fewer image tokens
    assert all(r["unit"] == "tok/s" and r["new_tokens"] >= 2 for r in llava)
    assert rows["llava"][0]["speed"].endswith("tok/s")


def test_failures_are_rows_and_the_run_goes_on(tmp_path):
    out = tmp_path / "page.md"
    done = run("--dry-run", "--only", "sd3-medium,sdxl,sd15", "--fail", "sd3-medium", "--fail", "sd15:exit",
               "--limit", "sdxl=1", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, rows, records = page(out)
    status = {part: cells[0]["status"] for part, cells in rows.items()}
    assert status == {"sd3-medium": "error: RuntimeError: a planted failure (--fail sd3-medium)",
                      "sdxl": "killed: past its time limit of 1 s", "sd15": "crashed (exit code 3)"}
    assert [r["part"] for r in records] == ["sd3-medium", "sdxl", "sd15"]
    assert records[0]["peak_rss_gib"] > 0   # the child's own figure, written with its error


def test_budget_spent_skips_parts(tmp_path):
    out = tmp_path / "page.md"
    done = run("--dry-run", "--only", "llava,sd15", "--budget", "0", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    _, rows, _ = page(out)
    assert list(rows) == ["llava", "sd15"]
    assert all(cells[0]["status"].startswith("skipped: 0 s of the 0 s budget left (run it with --only ")
               for cells in rows.values())


def test_unknown_part_is_refused_up_front(tmp_path):
    out = tmp_path / "page.md"
    done = run("--dry-run", "--only", "sd15,nope", "--out", str(out), timeout=60)
    assert done.returncode == 2 and "unknown part 'nope' in --only; known: sd15, sdxl" in done.stderr
    assert not out.exists()


def test_card_slug_names_the_page():
    bench = conftest.load_bench("device_check")
    assert bench.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.card_slug("Tesla T4") == "tesla-t4"
    assert "NVIDIA H200 is not a T4: the memory cap holds, the speed does not transfer" in bench.NOT_T4.format(
        card="NVIDIA H200")
