"""The benchmark harness end to end on the tiny SD 1.5 and SDXL: the same prompts and seeds for every model, well-formed
CSV, JSON and Markdown, plots and grids written; shape-true results labelled and without quality."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

import helpers
from helpers import bench, loading
from helpers.bench import harness, report

PROMPTS = ["a red cat", "a blue metallic sphere"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread for these timing runs: on 2 shared cores, 2 OpenMP threads competing with other processes
    made the tiny models 10-40 times slower (measured here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip():
    from helpers import quality

    return quality.tiny_clip()


@pytest.fixture(scope="module")
def result(clip):
    return bench.run_benchmark(["sd15", "sdxl"], prompts=PROMPTS, seed=7, clip=clip, progress=False)


def test_every_model_gets_the_same_prompts_and_seeds(result):
    assert result.seeds == [7, 8]
    assert [r["model"] for r in result.rows] == ["sd15", "sdxl"]
    for row in result.rows:
        assert row["seeds"] == [7, 8] and row["images"] == 2 and row["mode"] == "tiny"
        assert (row["steps"], row["width"], row["height"]) == (4, 64, 64)  # SMOKE MODE caps
        assert 0 < row["s_per_image_min"] <= row["s_per_image"] <= row["s_per_image_max"]
        assert row["it_per_s"] == pytest.approx(row["steps"] / row["s_per_image"], rel=1e-2)
        assert row["load_s"] > 0 and row["first_image_s"] > 0 and row["peak_ram_mib"] > 0
        assert row["peak_vram_mib"] is None  # no GPU here
        assert (row["route"], row["quantization"]) == ("cpu", "none")  # the route load_sd took, here the CPU
        assert 0 <= row["clip_score"] <= 100 and row["fid"] is None  # no reference set given
    # the harness's image for prompt 0 is the one generate paints with that seed
    pipe = loading.load_sd("sd15")
    again = helpers.generate(pipe, PROMPTS[0], num_inference_steps=4, width=64, height=64, guidance_scale=7.0, seed=7,
                             progress=False).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(result.images["sd15"][0]))
    assert not np.array_equal(np.asarray(result.images["sd15"][0]), np.asarray(result.images["sd15"][1]))


def test_results_are_written_well_formed(result, tmp_path):
    files = bench.write_results(result, tmp_path / "out", cell=96)
    with open(files["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(report.ROW_FIELDS) and [r["model"] for r in rows] == ["sd15", "sdxl"]
    assert all(float(r["s_per_image"]) > 0 and r["seeds"] == "7 8" and r["peak_vram_mib"] == "" for r in rows)
    document = json.loads(files["json"].read_text())
    assert document["prompts"] == PROMPTS and document["seeds"] == [7, 8]
    assert document["rows"] == result.rows and document["meta"]["mode"] == "tiny"
    assert set(document["clip_scores"]) == {"sd15", "sdxl"} and len(document["clip_scores"]["sd15"]) == 2
    text = files["markdown"].read_text()
    assert harness.TINY_NOTE in text and "Command: `" in text and "Machine: " in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:3] == ["model", "setting", "mode"] and len(table) == 3
    cells = dict(zip(header, (c.strip() for c in table[1].strip("|").split("|"))))
    assert cells["model"] == "sd15" and cells["size"] == "64x64" and cells["peak VRAM MiB"] == "-"
    assert cells["route"] == "cpu"
    assert report.cell_text({"route": "staged", "quantization": "4bit"}, "route") == "staged, 4bit"
    assert float(cells["s/image"]) > 0 and 0 <= float(cells["CLIP score"]) <= 100
    for key in ("speed_plot", "quality_plot"):
        with Image.open(files[key]) as im:
            assert im.format == "PNG" and im.width > 100
    assert [p.name for p in files["grids"]] == ["prompt_00.png", "prompt_01.png"]
    with Image.open(files["grids"][1]) as grid:
        assert grid.size == (2 * 96, 96 + 20)  # two models side by side, a label band above


def test_shape_true_results_say_random_weights_and_have_no_quality(monkeypatch, tmp_path, capsys):
    built = []

    def fake_builder(name, dtype, device):  # the planner's real-size builder, stood in for by the tiny model
        built.append((name, str(dtype), device))
        return loading.load_sd(name)

    monkeypatch.setattr(harness, "_build_shape_true", fake_builder)
    result = bench.run_benchmark(["sd15"], prompts=PROMPTS[:1], shape_true=True, warmup=0, progress=False,
                                 vram_cap_gib=15)
    assert built == [("sd15", "torch.float32", "cpu")]
    assert "no CUDA GPU here, so there is no VRAM to cap" in capsys.readouterr().out
    assert result.meta["vram_cap_gib"] is None
    (row,) = result.rows
    assert row["mode"] == "shape-true" and row["clip_score"] is None and result.meta["quality"] is None
    assert row["first_image_s"] == row["s_per_image"]  # no warm-up: the first image is the timed one
    files = bench.write_results(result, tmp_path)
    assert "quality_plot" not in files
    assert f"**{bench.SHAPE_TRUE_NOTE}.**" in files["markdown"].read_text()


def test_settings_and_a_reference_set(clip, tmp_path):
    reference = [Image.fromarray((np.random.RandomState(i).rand(64, 64, 3) * 255).astype("uint8")) for i in range(3)]
    result = bench.run_benchmark("sd15", prompts=PROMPTS, settings=[{"label": "2 steps", "num_inference_steps": 2},
                                                                    {"num_inference_steps": 3, "sampler": "Euler"}],
                                 clip=clip, reference=reference, progress=False)
    assert list(result.images) == ["sd15 / 2 steps", "sd15 / steps=3, sampler=Euler"]
    assert [r["steps"] for r in result.rows] == [2, 3] and result.rows[1]["sampler"] == "Euler"
    assert all(r["fid"] is not None and r["kid"] is not None for r in result.rows)


@pytest.mark.parametrize("kwargs, message", [
    ({"models": []}, "`models` is empty"),
    ({"models": ["sd15", "sd15"]}, "names a model twice"),
    ({"models": ["sd15"], "settings": [{"steps": 3}]}, "Unknown setting key"),
    ({"models": ["sd15"], "prompts": [""]}, "`prompts` must be non-empty"),
    ({"models": ["sd15"], "warmup": -1}, "`warmup` must be 0 or more"),
])
def test_bad_arguments_are_refused_before_any_load(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.run_benchmark(**kwargs)


def test_the_prompt_set_and_other_prompt_files(tmp_path):
    prompts = bench.load_prompts()
    assert len(prompts) == 12 and len(set(prompts)) == 12 and prompts[0] == "a shiba inu"
    (tmp_path / "mine.txt").write_text("a cat\n\n a dog \n")
    assert bench.load_prompts(tmp_path / "mine.txt") == ["a cat", "a dog"]
    (tmp_path / "bad.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="no `Prompt` column"):
        bench.load_prompts(tmp_path / "bad.csv")


def test_ram_peak_sees_an_allocation():
    with harness.RamPeak(interval=0.001) as ram:
        before = ram.take()
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del block
        assert ram.take() >= before + 60


def test_cli_bench_writes_the_results_and_says_smoke_mode(tmp_path, capsys):
    from helpers import cli

    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    out = tmp_path / "out"
    code = cli.main(["bench", "--models", "sd15", "--steps", "2", "--prompts", str(tmp_path / "p.txt"), "--no-quality",
                     "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "SMOKE MODE" in printed and "| sd15 | steps=2 | tiny |" in printed
    document = json.loads((out / "results.json").read_text())
    assert document["prompts"] == ["a cat", "a dog"] and document["rows"][0]["steps"] == 2
    assert document["meta"]["command"].endswith(f"python -m helpers bench --models sd15 --no-quality --steps 2 "
                                                f"--prompts {tmp_path / 'p.txt'} --out {out}")
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["prompt_00.png", "prompt_01.png"]


def test_a_model_that_fails_to_load_is_reported_and_the_others_still_run(monkeypatch, tmp_path, clip):
    real_load = loading.load_sd

    def load_sd(name, *args, **kwargs):
        if name == "sdxl":
            raise OSError("Could not load 'sdxl': gated, no token")
        return real_load(name, *args, **kwargs)

    monkeypatch.setattr(loading, "load_sd", load_sd)
    result = bench.run_benchmark(["sdxl", "sd15"], prompts=PROMPTS[:1], clip=clip, progress=False)
    failed, ok = result.rows
    assert failed["model"] == "sdxl" and failed["error"] == "OSError: Could not load 'sdxl': gated, no token"
    assert failed["s_per_image"] is None and failed["clip_score"] is None
    assert ok["model"] == "sd15" and ok["error"] is None and ok["clip_score"] is not None
    files = bench.write_results(result, tmp_path, cell=64)
    assert "**sdxl (default) failed:** OSError" in files["markdown"].read_text()
    assert "| sdxl | default | tiny | - | - | - | - |" in files["markdown"].read_text()  # dtype, steps, size, load
    with Image.open(files["grids"][0]) as grid:
        assert grid.size == (64, 64 + 20)  # only the model that ran


def test_an_unknown_model_name_is_refused_before_any_load():
    with pytest.raises(ValueError, match="Unknown model 'sd-16'"):
        bench.run_benchmark(["sd15", "sd-16"], prompts=PROMPTS)


def test_bench_models_script_writes_its_report(tmp_path):
    import conftest
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "models.md"
    sections = conftest.load_bench("models").main(["--tiny", "sd15", "--shape-true", "--prompts", "1",
                                                   "--out", str(out)])
    assert [title for title, _ in sections] == ["Tiny models (SMOKE MODE)"]  # no shape-true model: no part 2
    text = out.read_text()
    assert text.startswith("# Model benchmark on this machine (CPU)") and "Torch threads: 1." in text
    assert "python bench/models.py --tiny sd15 --shape-true --prompts 1" in text and "| sd15 | default | tiny |" in text
    assert torch.get_num_threads() == threads and helpers.is_tiny()  # the script put both back


def test_route_of_a_pipeline():
    """What load_sd recorded (pipe._helpers_route) where it is there; else offload hooks, bitsandbytes layers, device."""
    from types import SimpleNamespace

    import bitsandbytes as bnb
    import torch

    from helpers import memory

    recorded = SimpleNamespace(components={}, _helpers_route=memory.Route("staged", "4bit", ("transformer",)))
    assert bench.route_of(recorded, "cuda") == ("staged", "4bit")
    assert bench.route_of(SimpleNamespace(components={}, _all_hooks=[object()]), "cuda") == ("model_offload", "none")
    quantized = SimpleNamespace(components={"transformer": torch.nn.Sequential(bnb.nn.Linear4bit(64, 64)),
                                            "tokenizer": object()})
    assert bench.route_of(quantized, "cuda") == ("gpu", "4bit")
    assert bench.route_of(SimpleNamespace(components={}), "cpu") == ("cpu", "none")
