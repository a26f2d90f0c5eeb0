"""Two processes on CPU (DDP over gloo): `accelerate launch --multi_gpu` of the CLI and accelerate's
notebook_launcher. Each process trains on its own share of the batches and both end with identical LoRA weights; one
process writes the log, the checkpoints' folders and the exports. (`accelerate launch --cpu --num_processes 2` would
start ONE process: FACTS.md.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.training import loop
from conftest import draw_dataset

ROOT = Path(__file__).resolve().parents[1]


COLOURED_CATS = [f"a photo of a cat, {colour}" for colour in ("red", "blue", "green")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return draw_dataset(tmp_path_factory.mktemp("data") / "2_sks cat", [(64, 64)] * 3, COLOURED_CATS)


def config(dataset, run_dir, **kwargs):
    settings = dict(dataset=str(dataset), run_dir=str(run_dir), resolution=64, rank=4, alpha=4, learning_rate=1e-2,
                    max_train_steps=4, checkpoint_every=2, seed=0, trigger="sks", flip_p=0.5)
    return loop.TrainConfig(**{**settings, **kwargs})


def check_two_ranks(run_dir: Path, dump: Path) -> None:
    ranks = [json.loads((dump / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    steps = [[step for step, _ in r["seen"]] for r in ranks]
    assert steps == [[1, 2, 3, 4]] * 2                              # the same number of steps on both
    paths = [[tuple(p) for _, p in r["seen"]] for r in ranks]
    assert paths[0] != paths[1]                                     # each trained on its own share of the batches
    a, b = (load_file(dump / f"rank-{r}.safetensors") for r in (0, 1))
    assert a.keys() == b.keys() and len(a) > 8
    assert all(torch.equal(a[k], b[k]) for k in a)                  # DDP kept the two copies identical
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)    # and they were trained (lora_B starts at 0)
    with open(run_dir / "loss.csv") as f:
        assert [line.split(",")[0] for line in f.read().split()] == ["step", "1", "2", "3", "4"]  # one writer
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert {p.name for p in (run_dir / "checkpoint-4").glob("random_states_*")} == {"random_states_0.pkl",
                                                                                  "random_states_1.pkl"}
    exported = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")
    assert len(exported) == len(a) and (run_dir / "lora" / "sks.safetensors").is_file()


def test_accelerate_launch_of_the_cli_trains_on_two_processes(dataset, tmp_path, monkeypatch):
    """Through loop.launch's fallback (a kernel that has touched CUDA): accelerate launch --multi_gpu of the CLI."""
    monkeypatch.setenv(loop.RANK_DUMP_ENV, str(tmp_path / "ranks"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))   # storage's local fallback, in the subprocesses: not shared
    monkeypatch.setattr(loop, "_cuda_initialized", lambda: True)
    run_dir = tmp_path / "run"
    result = loop.launch(config(dataset, run_dir), num_processes=2)
    assert result.steps == 4 and len(result.losses) == 4 and result.lora_path.is_file()
    check_two_ranks(run_dir, tmp_path / "ranks")


def test_notebook_launcher_trains_on_two_processes(dataset, tmp_path):
    """notebook_launcher forks the calling process; here that is a plain Python process (a Jupyter kernel on CPU
    would do the same fork)."""
    run_dir = tmp_path / "run"
    script = (f"from helpers.training import loop, config\n"
              f"result = loop.launch(config.read_config({str(run_dir / 'config.json')!r}), num_processes=2, "
              f"progress=False)\n"
              f"print('STEPS', result.steps)\n")
    from helpers.training.config import write_config

    run_dir.mkdir()
    write_config(config(dataset, run_dir), run_dir / "config.json")
    env = {**os.environ, loop.RANK_DUMP_ENV: str(tmp_path / "ranks"), "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "STEPS 4" in done.stdout
    check_two_ranks(run_dir, tmp_path / "ranks")


def test_sdxl_dreambooth_with_text_encoders_on_two_processes(dataset, tmp_path):
    """SDXL with both text encoders' LoRAs (the first encoder's last layer gets no gradient: DDP must be told) and
    prior preservation (class images painted once, by the main process), from the CLI under accelerate launch."""
    from helpers.training.config import write_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(config(dataset, run_dir, base_model="sdxl", train_text_encoder=True, max_train_steps=2,
                        instance_prompt="a photo of sks cat", class_prompt="a photo of a cat", num_class_images=2),
                 run_dir / "config.json")
    env = {**os.environ, loop.RANK_DUMP_ENV: str(tmp_path / "ranks"), "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "helpers", "dreambooth", str(run_dir / "config.json")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("class image 1 of 2") == 1                    # painted by one process only
    assert done.stdout.count("run folder:") == 1 and done.stdout.count("lora:") == 1  # the first process speaks
    a, b = (load_file(tmp_path / "ranks" / f"rank-{r}.safetensors") for r in (0, 1))
    assert {k.split(".")[0] for k in a} == {"unet", "text_encoder_0", "text_encoder_1"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("text_encoder_1") and "lora_B" in k)  # trained
    assert sorted(p.name for p in (run_dir / "class_images").glob("*.png")) == ["00000-0.png", "00001-1.png"]
