import os
import subprocess
import sys
from pathlib import Path

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
