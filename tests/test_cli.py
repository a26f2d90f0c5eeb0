import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


def run(*args, **env):
    return subprocess.run([sys.executable, "-m", "helpers", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_demo_without_gpu_runs_on_tiny_models_and_says_so(tmp_path):
    # No HELPERS_TINY: the demo itself must notice that there is no GPU and switch to the tiny models.
    result = run("demo", "--out", str(tmp_path), "--seed", "7", HELPERS_TINY="0", CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "SMOKE MODE: no CUDA GPU here" in out
    image_path = Path(out.split("image:")[1].split()[0])
    caption_path = Path(out.split("caption:")[1].split()[0])
    assert image_path == tmp_path / "00000-7.png" and caption_path == image_path.with_suffix(".txt")
    with Image.open(image_path) as im:
        assert im.size == (64, 64)
        assert "Seed: 7" in im.text["parameters"] and "Model: sd15 (tiny)" in im.text["parameters"]
    assert caption_path.read_text().endswith("\n")


def test_doctor_reports(tmp_path):
    result = run("doctor")
    assert result.returncode == 0, result.stderr
    assert "versions: torch" in result.stdout and "diffusers 0.42.1" in result.stdout
    assert "hub: offline (HF_HUB_OFFLINE=1)" in result.stdout
    assert "no GPU: the real models need one" in result.stdout


def test_unknown_command():
    result = run("paint")
    assert result.returncode == 2 and "invalid choice: 'paint'" in result.stderr


def test_hub_is_unreachable_offline_without_cached_weights():
    from helpers import cli

    assert cli.hub_reachable(["stable-diffusion-v1-5/stable-diffusion-v1-5", "llava-hf/llava-v1.6-mistral-7b-hf"]) \
        is False


def test_caption_cli_writes_captions_and_reports_failures(tmp_path):
    from helpers import captions

    assert tuple(captions.STYLES) == __import__("helpers.cli").cli.CAPTION_STYLES
    for i in range(2):
        Image.new("RGB", (40, 40), (i * 100, 50, 50)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"junk")
    result = run("caption", str(tmp_path), "--style", "tags", "--trigger", "sks")
    assert result.returncode == 1  # one image could not be captioned
    assert "2 caption(s) written, 0 skipped" in result.stdout and "bad.png" in result.stdout
    assert (tmp_path / "0.txt").read_text().startswith("sks, ")
    again = run("caption", str(tmp_path))
    assert "0 caption(s) written, 2 skipped" in again.stdout


def test_chat_cli(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "x.png")
    result = run("chat", str(tmp_path / "x.png"), "What is in this image?", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "SMOKE MODE" in result.stderr


def test_chat_cli_bad_input_is_one_clear_line(tmp_path):
    result = run("chat", str(tmp_path / "missing.png"), "What?")
    assert result.returncode == 2 and result.stderr.strip().startswith("error: No image at")  # before any loading
    assert "Traceback" not in result.stderr
    result = run("chat", str(tmp_path / "missing.png"), "  ")
    assert result.returncode == 2 and "The question must be a non-empty string" in result.stderr
    result = run("caption", str(tmp_path))
    assert result.returncode == 2 and "No images in" in result.stderr


def test_generate_cli(tmp_path):
    result = run("generate", "a photo of a cat", "--seed", "3", "--steps", "2", "--sampler", "DPM++ 2M Karras",
                 "--batch-size", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.split()]
    assert [p.name for p in paths] == ["00000-3.png", "00001-4.png"]
    with Image.open(paths[1]) as im:
        assert "Seed: 4" in im.text["parameters"] and "Sampler: DPM++ 2M, Schedule type: Karras" in im.text["parameters"]


def test_inpaint_cli(tmp_path):
    Image.new("RGB", (64, 64), (200, 100, 50)).save(tmp_path / "photo.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    result = run("inpaint", str(tmp_path / "photo.png"), str(tmp_path / "mask.png"), "a red car", "--seed", "1",
                 "--steps", "2", "--only-masked", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    with Image.open(result.stdout.split()[0]) as im:
        assert im.size == (64, 64) and im.getpixel((2, 2)) == (200, 100, 50)  # unmasked: untouched
        assert "Inpaint area: Only masked" in im.text["parameters"]


@pytest.mark.parametrize("args, message", [
    (["generate", "a cat", "--width", "500"], "`width` has to be a multiple of 8 but is 500: use 504"),
    (["generate", "a cat", "--sampler", "Eular a"], "Euler a"),
    (["generate", "a cat", "--lora", "style.ckpt:0.5"], "No LoRA at 'style.ckpt'"),
])
def test_generate_cli_bad_input(args, message, tmp_path):
    result = run(*args, "--out", str(tmp_path))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


# --- train-lora --------------------------------------------------------------------------------------------------

def _training_config(tmp_path) -> Path:
    """A tiny kohya dataset and a config.json for it, with paths relative to the file (as a moved run folder has)."""
    import json

    data = tmp_path / "data" / "2_sks"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 120, 60, 200 - i * 90)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a square, {['red', 'blue'][i]}\n")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"dataset": "data", "run_dir": "run", "resolution": 64, "rank": 4, "alpha": 4,
                                  "max_train_steps": 1000, "checkpoint_every": 1, "seed": 1}))
    return config


def test_train_lora_cli_trains_then_resumes_at_the_end(tmp_path):
    import torch
    from safetensors.torch import load_file

    config = _training_config(tmp_path)
    result = run("train-lora", str(config), "--set", "max_train_steps=2", "--set", "trigger=sks", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert f"run folder: {tmp_path / 'run'}" in result.stdout and "resume point: none" in result.stdout
    lora_path = Path(result.stdout.split("lora:")[1].split()[0])
    assert lora_path == tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"
    weights = load_file(lora_path)
    assert any(".lora" in k for k in weights) and len(weights) > 8
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (tmp_path / "run" / "loss.csv").read_text().count("\n") == 3  # header + 2 steps

    again = run("train-lora", str(config), "--steps", "2", "--set", "trigger=sks", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "resume point: checkpoint-2 (step 2 of 2)" in again.stdout and "Resuming from" in again.stdout
    assert "steps done: 2" in again.stdout
    assert (tmp_path / "run" / "loss.csv").read_text().count("\n") == 3  # no step trained twice
    resumed = load_file(Path(again.stdout.split("lora:")[1].split()[0]))
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[k], resumed[k]) for k in weights)


@pytest.mark.parametrize("args, message", [
    (["--set", "learning_rat=1e-3"], ("Unknown TrainConfig field(s): 'learning_rat'. Valid fields: dataset, "
                                      "run_dir, base_model, resolution")),
    (["--set", "max_train_steps"], "--set expects KEY=VALUE"),
    (["--set", "resolution=500"], "`resolution` must be a multiple of 64, not 500: use 512"),
])
def test_train_lora_cli_bad_settings_are_one_clear_line(args, message, tmp_path):
    config = _training_config(tmp_path)
    result = run("train-lora", str(config), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written


def test_train_lora_cli_unknown_key_in_the_file(tmp_path):
    import json

    config = _training_config(tmp_path)
    config.write_text(json.dumps({**json.loads(config.read_text()), "epochs": 3}))
    result = run("train-lora", str(config))
    assert result.returncode == 2 and "'epochs'" in result.stderr and "max_train_steps" in result.stderr
    result = run("train-lora", str(tmp_path / "missing.json"))
    assert result.returncode == 2 and "No training config at" in result.stderr and "Traceback" not in result.stderr


def test_train_config_round_trip_and_set_values(tmp_path):
    from helpers.training import config as training_config
    from helpers.training.loop import TrainConfig

    original = TrainConfig(dataset=str(tmp_path / "d"), run_dir=str(tmp_path / "r"), trigger="sks", rank=8)
    path = training_config.write_config(original, tmp_path)
    assert path == tmp_path / "config.json"
    assert training_config.read_config(path) == original
    assert training_config.read_config(tmp_path) == original  # the folder finds its config.json
    overrides = training_config.parse_overrides(["learning_rate=5e-5", "trigger=1990s", "shuffle_captions=true",
                                                 "trigger=42", "seed=7"])
    assert overrides == {"learning_rate": 5e-5, "trigger": "42", "shuffle_captions": True, "seed": 7}
    changed = training_config.read_config(path, overrides)
    assert (changed.learning_rate, changed.trigger, changed.rank) == (5e-5, "42", 8)
    assert training_config.parse_overrides(["trigger=null"]) == {"trigger": None}


# --- dreambooth ----------------------------------------------------------------------------------------------------

def test_dreambooth_cli_trains_with_class_images_then_resumes_without_painting_them_again(tmp_path):
    from helpers import images

    config = _training_config(tmp_path)
    args = ["--set", "instance_prompt=a photo of sks dog", "--set", "class_prompt=a photo of a dog",
            "--set", "num_class_images=5", "--no-progress"]  # SMOKE MODE caps the class images at 2
    result = run("dreambooth", str(config), "--set", "max_train_steps=2", *args)
    assert result.returncode == 0, result.stderr
    class_dir = tmp_path / "run" / "class_images"
    assert f"class images: {class_dir} (5 of 'a photo of a dog'" in result.stdout
    assert "instance prompt: 'a photo of sks dog'" in result.stdout and "resume point: none" in result.stdout
    painted = images.list_images(class_dir)
    assert len(painted) == 2
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in painted}
    lora_path = Path(result.stdout.split("lora:")[1].split()[0])
    assert lora_path == tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors" and lora_path.is_file()
    assert (tmp_path / "run" / "loss.csv").read_text().count("\n") == 3  # header + 2 steps

    again = run("dreambooth", str(config), "--steps", "3", *args)
    assert again.returncode == 0, again.stderr
    assert "resume point: checkpoint-2 (step 2 of 3)" in again.stdout and "steps done: 3" in again.stdout
    assert images.list_images(class_dir) == painted  # the cached class images are reused, not painted again
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in painted} == stamps


@pytest.mark.parametrize("extra", [[], ["--set", "instance_prompt= "]])
def test_dreambooth_cli_refuses_a_config_without_instance_prompt(extra, tmp_path):
    config = _training_config(tmp_path)
    result = run("dreambooth", str(config), "--set", "class_prompt=a photo of a dog", *extra)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dreambooth needs `instance_prompt`")
    assert '--set "instance_prompt=a photo of sks dog"' in lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written
    assert result.stdout == ""


def test_an_out_of_memory_stop_is_one_line_with_its_advice(monkeypatch, capsys):
    from helpers import cli, oom

    def runs_out(args):
        raise oom.OutOfMemoryStop("Out of GPU memory: tried one at a time; use a smaller size.")

    monkeypatch.setattr(cli, "plan", runs_out)
    assert cli.main(["plan", "sd15"]) == 2
    err = capsys.readouterr().err
    assert err == "error: Out of GPU memory: tried one at a time; use a smaller size.\n"
