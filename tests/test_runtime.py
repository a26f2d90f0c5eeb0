import pytest

import helpers.runtime as rt

T4 = rt.Profile(platform="colab", device="cuda", gpu_name="Tesla T4", vram_gb=15.0, compute_capability=(7, 5),
                gpu_count=1, ram_gb=12.7, torch_version="2.8.0+cu126")
A100 = rt.Profile(platform="local", device="cuda", gpu_name="NVIDIA A100-SXM4-40GB", vram_gb=39.4,
                  compute_capability=(8, 0), gpu_count=1, ram_gb=83.5, torch_version="2.8.0")
CPU = rt.Profile(platform="local", device="cpu", ram_gb=24.0, torch_version="2.13.0+cpu")
COLAB_CPU = rt.Profile(platform="colab", device="cpu", ram_gb=12.7, torch_version="2.8.0")


@pytest.fixture
def real_mode(monkeypatch):
    monkeypatch.setenv("HELPERS_TINY", "0")


def test_dtype_policy():
    assert (T4.dtype_name, T4.native_bf16) == ("float16", False)
    assert (A100.dtype_name, A100.native_bf16) == ("bfloat16", True)
    assert (CPU.dtype_name, CPU.native_bf16) == ("float32", False)
    assert rt.Profile(platform="local", device="mps").dtype_name == "float16"


def test_pick_dtype_maps_the_policy_to_torch():
    import torch

    assert rt.pick_dtype(T4) is torch.float16
    assert rt.pick_dtype(A100) is torch.bfloat16
    assert rt.pick_dtype(CPU) is torch.float32


def test_describe_t4(real_mode):
    line = rt.describe(T4, "files /content/drive/MyDrive/llava-sd-notebooks")
    assert line == ("colab | GPU Tesla T4 15.0 GB (cc 7.5, no native bf16) | RAM 12.7 GB | dtype float16 | "
                    "files /content/drive/MyDrive/llava-sd-notebooks")


def test_describe_a100_and_cpu(real_mode):
    assert "(cc 8.0, native bf16)" in rt.describe(A100) and "dtype bfloat16" in rt.describe(A100)
    assert rt.describe(CPU) == "local | no GPU | RAM 24.0 GB | dtype float32"


def test_describe_says_smoke_mode():
    assert "SMOKE MODE" in rt.describe(CPU)


def test_setup_stops_on_colab_without_gpu(real_mode, capsys):
    with pytest.raises(rt.SetupStop, match=r"^STOP: this Colab session has no GPU\. Runtime > Change runtime type"):
        rt.setup(mount=False, profile=COLAB_CPU)
    assert "colab | no GPU" in capsys.readouterr().out  # the one line still comes first


@pytest.mark.parametrize("profile, expected", [
    (rt.Profile(platform="kaggle", device="cpu", torch_version="2.8.0"), "Settings > Accelerator > GPU T4 x2"),
    (CPU, "HELPERS_TINY=1"),
    (rt.Profile(platform="colab", device="cuda", torch_version=None), "bash colab_setup.sh"),
])
def test_check_stops_with_what_to_do(real_mode, profile, expected):
    with pytest.raises(rt.SetupStop, match="^STOP: ") as e:
        rt.check(profile)
    assert expected in str(e.value)


def test_setup_on_t4_prints_one_line_and_returns_the_profile(real_mode, capsys):
    assert rt.setup(mount=False, profile=T4) is T4
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["colab | GPU Tesla T4 15.0 GB (cc 7.5, no native bf16) | RAM 12.7 GB | dtype float16"]


def test_setup_in_smoke_mode_runs_on_cpu(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HELPERS_HOME", str(tmp_path))
    assert rt.setup(profile=CPU) is CPU
    line = capsys.readouterr().out
    assert "SMOKE MODE" in line and f"files {tmp_path}" in line


@pytest.mark.parametrize("environ, platform", [
    ({"COLAB_RELEASE_TAG": "release-colab_20261101"}, "colab"), ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, "kaggle"),
    ({"CI": "true"}, "ci"), ({}, "local")])
def test_detect_platform(environ, platform):
    assert rt.detect_platform(environ) == platform


def test_detect_profile_on_this_machine():
    p = rt.detect_profile()
    assert p.device in ("cpu", "cuda", "mps") and p.ram_gb > 1 and p.torch_version
