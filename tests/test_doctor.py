"""helpers.doctor: each check on a hand-built Environment (no GPU, driver or Colab needed), and the real report."""
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from helpers import doctor
from helpers.runtime import Profile

ROOT = Path(__file__).resolve().parents[1]
T4 = Profile(platform="colab", device="cuda", gpu_name="Tesla T4", vram_gb=15.0, compute_capability=(7, 5),
             gpu_count=1, ram_gb=12.7, torch_version="2.8.0+cu126")
A100 = Profile(platform="colab", device="cuda", gpu_name="NVIDIA A100-SXM4-40GB", vram_gb=40.0,
               compute_capability=(8, 0), gpu_count=1, ram_gb=83.0, torch_version="2.8.0+cu126")
CPU = Profile(platform="local", device="cpu", ram_gb=24.0, torch_version="2.13.0+cpu")


def env(profile=T4, **kw):
    kw.setdefault("torch_cuda", "12.6" if profile.device == "cuda" else None)
    kw.setdefault("nvidia_gpu", profile.device == "cuda")
    kw.setdefault("driver_cuda", "12.6" if kw["nvidia_gpu"] else None)
    return doctor.Environment(profile=profile, **kw)


def ids(environment):
    return [f.check for f in doctor.run_checks(environment)]


def test_a_healthy_t4_has_no_findings():
    assert ids(env(T4, drive_mounted=True, versions={"bitsandbytes": "0.50.2"})) == []


def test_no_gpu():
    (finding,) = doctor.check_no_gpu(env(CPU))
    assert finding.check == "no-gpu" and "T4 GPU" in finding.fix and "HELPERS_TINY=1" in finding.fix
    assert doctor.check_no_gpu(env(T4)) == []


def test_bf16_claimed_on_a_t4_but_not_on_an_a100():
    (finding,) = doctor.check_bf16_on_t4(env(T4, bf16_claimed=True))
    assert "compute capability 7.5" in finding.problem and "float16" in finding.fix
    assert doctor.check_bf16_on_t4(env(A100, bf16_claimed=True)) == []
    assert doctor.check_bf16_on_t4(env(T4, bf16_claimed=False)) == []


def test_cpu_torch_beside_an_nvidia_gpu():
    # the GPU is there (nvidia-smi answers) but torch cannot see it: a CPU build replaced Colab's CUDA build
    profile = Profile(platform="colab", device="cpu", ram_gb=12.7, torch_version="2.13.0+cpu")
    (finding,) = doctor.check_torch_cuda(env(profile, nvidia_gpu=True, torch_cuda=None, driver_cuda="12.4"))
    assert finding.check == "torch-cuda-mismatch" and "CPU build" in finding.problem
    assert "Disconnect and delete runtime" in finding.fix  # on Colab: never reinstall torch by hand
    local = Profile(platform="local", device="cpu", ram_gb=12.7, torch_version="2.13.0+cpu")
    (finding,) = doctor.check_torch_cuda(env(local, nvidia_gpu=True, torch_cuda=None, driver_cuda="12.4"))
    assert "download.pytorch.org/whl/cu124" in finding.fix
    assert doctor.check_torch_cuda(env(CPU)) == []  # no GPU at all: nothing to pair


def test_torch_built_for_a_newer_cuda_than_the_driver():
    (finding,) = doctor.check_torch_cuda(env(T4, torch_cuda="12.8", driver_cuda="12.4"))
    assert "CUDA 12.8, newer than the 12.4" in finding.problem
    assert doctor.check_torch_cuda(env(T4, torch_cuda="12.4", driver_cuda="12.10")) == []  # 12.10 > 12.4, numerically
    assert doctor.check_torch_cuda(env(T4, torch_cuda="11.8", driver_cuda="12.2")) == []


def test_bitsandbytes_without_cuda():
    (finding,) = doctor.check_bitsandbytes(env(CPU, versions={"bitsandbytes": "0.50.2"}))
    assert finding.check == "bitsandbytes-without-cuda" and "no CUDA GPU" in finding.problem
    broken = env(T4, versions={"bitsandbytes": "0.50.2"},
                 import_errors={"bitsandbytes": "RuntimeError: CUDA Setup failed despite GPU being available"})
    (finding,) = doctor.check_bitsandbytes(broken)
    assert "CUDA Setup failed" in finding.cause and "bitsandbytes==0.50.2" in finding.fix
    assert doctor.check_bitsandbytes(env(CPU, versions={})) == []  # not installed: nothing to say


def test_xformers_built_for_another_torch():
    (finding,) = doctor.check_xformers(env(T4, versions={"xformers": "0.0.28"}, xformers_torch="2.5.1"))
    assert "built for torch 2.5.1" in finding.problem and "2.8.0+cu126" in finding.problem
    assert "pip uninstall -y xformers" in finding.fix
    assert doctor.check_xformers(env(T4, versions={"xformers": "0.0.32"}, xformers_torch="2.8.0")) == []


def test_xformers_torch_is_read_from_its_metadata(monkeypatch):
    monkeypatch.setattr(doctor.importlib.metadata, "requires",
                        lambda name: ["numpy", "torch==2.5.1", "fairscale; extra == 'dev'"])
    assert doctor._xformers_torch() == "2.5.1"


def test_low_ram_for_the_chosen_model():
    from helpers import memory

    # SD3 and FLUX in fp16 outweigh 12.7 GB, but load by a 4-bit route whose RAM peak the planner checked
    assert memory.weights_gib("flux-dev", "float16") > 12.7
    assert doctor.check_ram(env(T4, model="sd3-medium")) == doctor.check_ram(env(T4, model="flux-dev")) == []
    (finding,) = doctor.check_ram(env(dataclasses.replace(T4, ram_gb=6.0), model="flux-dev"))
    assert finding.check == "low-ram" and "flux-dev fits no loading route" in finding.problem
    assert "RAM" in finding.cause   # the planner's figures: needed against the machine's
    need = memory.weights_gib("sd3-medium", "float32")
    (finding,) = doctor.check_ram(env(dataclasses.replace(CPU, ram_gb=8.0), model="sd3-medium"))
    assert f"sd3-medium in float32 needs about {need:.1f} GiB" in finding.problem and "8.0 GiB of RAM" in finding.problem
    assert doctor.check_ram(env(T4, model="sd15")) == []
    assert doctor.check_ram(env(T4, model="llava-1.6-mistral-7b")) == []  # 4-bit on a T4: about 4-5 GiB
    (finding,) = doctor.check_ram(env(dataclasses.replace(CPU, ram_gb=8.0), model="llava-1.6-mistral-7b"))
    assert "in float32" in finding.problem  # no GPU: no 4-bit, 32-bit weights in RAM
    assert doctor.check_ram(env(T4)) == []  # no model chosen


def test_drive_not_mounted_on_colab_only():
    (finding,) = doctor.check_drive(env(T4, drive_mounted=False))
    assert finding.check == "drive-not-mounted" and "mount_drive()" in finding.fix
    assert doctor.check_drive(env(CPU, drive_mounted=False)) == []


def test_missing_token_for_a_gated_model():
    (finding,) = doctor.check_token(env(T4, model="sd3-medium", token=False))
    assert "Colab secret HF_TOKEN" in finding.fix and "stabilityai/stable-diffusion-3-medium-diffusers" in finding.fix
    assert doctor.check_token(env(T4, model="sd3-medium", token=True)) == []
    assert doctor.check_token(env(T4, model="sd15", token=False)) == []  # not gated


def test_versions_outside_the_tested_ranges():
    findings = doctor.check_versions(env(T4, version_problems=[("diffusers", "0.41.0", ">=0.42.1,<0.43"),
                                                               ("peft", None, ">=0.21.2,<0.22")]))
    assert [f.check for f in findings] == ["versions", "versions"]
    assert "diffusers 0.41.0 is outside the tested range >=0.42.1,<0.43" in findings[0].problem
    assert "pip install 'diffusers>=0.42.1,<0.43'" in findings[0].fix and "peft is missing" in findings[1].problem


def test_version_problems_reads_the_installed_package(monkeypatch):
    assert doctor.version_problems() == []  # this venv is the tested set
    monkeypatch.setattr(doctor, "_version", lambda name: "0.1.0" if name == "diffusers" else "99")
    real = doctor.importlib.metadata.requires
    monkeypatch.setattr(doctor.importlib.metadata, "requires",
                        lambda name: ["diffusers>=0.42.1,<0.43", "pytest>=8; extra == 'test'"] if name == doctor.DIST
                        else real(name))
    assert doctor.version_problems() == [("diffusers", "0.1.0", "<0.43,>=0.42.1")]


def test_every_finding_names_its_anchor_and_every_check_is_listed():
    everything = env(Profile(platform="colab", device="cpu", ram_gb=4.0, torch_version="2.13.0+cpu"), nvidia_gpu=True,
                     torch_cuda=None, versions={"bitsandbytes": "0.50.2", "xformers": "0.0.28", "notebook": "6.5.7",
                                                "widgetsnbextension": "3.6.10"},
                     xformers_torch="2.5.1", import_errors={"torchvision": "RuntimeError: operator torchvision::nms "
                                                                            "does not exist"},
                     drive_mounted=False, model="sd3-medium", version_problems=[("peft", "0.30", "<0.22")],
                     folders={"HELPERS_HOME": "HELPERS_HOME='/x' is read-only"})
    found = ids(everything)
    assert set(found) == set(doctor.CHECKS) - {"bf16-on-t4"}  # bf16 needs a CUDA profile
    for finding in doctor.run_checks(everything):
        assert str(finding).endswith(f"(see TROUBLESHOOTING.md#{finding.check})")


def test_home_and_cache_folders(tmp_path, monkeypatch):
    monkeypatch.delenv("HELPERS_HOME", raising=False)
    monkeypatch.delenv("HELPERS_CACHE", raising=False)
    assert doctor.folder_problems() == {}  # unset: the defaults are not the variables' business
    (tmp_path / "file").write_text("x")
    assert doctor.folder_problem(tmp_path / "file") == "is a file, not a folder"
    below = doctor.folder_problem(tmp_path / "file" / "below")
    assert below == f"is below {str(tmp_path / 'file')!r}, a file, not a folder"
    assert doctor.folder_problem(tmp_path / "new" / "folder") is None  # made on first use
    monkeypatch.setattr(doctor.os, "access", lambda path, mode: False)  # read-only (root ignores chmod)
    assert doctor.folder_problem(tmp_path) == "is read-only"
    monkeypatch.setenv("HELPERS_CACHE", str(tmp_path / "cache"))
    assert doctor.folder_problems() == {"HELPERS_CACHE": f"HELPERS_CACHE={str(tmp_path / 'cache')!r} is below "
                                                         f"{str(tmp_path)!r}, a read-only folder"}
    (finding,) = doctor.check_folders(env(CPU, folders=doctor.folder_problems()))
    assert finding.problem.startswith("HELPERS_CACHE=") and "export HELPERS_CACHE=" in finding.fix


def test_gather_reads_this_machine():
    environment = doctor.gather("sd15")
    assert environment.profile.device == "cpu" and environment.torch_cuda is None and environment.offline
    assert environment.versions["diffusers"] == "0.42.1" and environment.model == "sd15"


def test_report_prints_findings_and_refuses_an_unknown_model(capsys):
    assert doctor.report("sd15") == 0
    out = capsys.readouterr().out
    assert "versions: torch" in out and "[!] no GPU: the real models need one" in out and "finding(s)." in out
    with pytest.raises(ValueError, match="`--model` must be a catalogue name, not 'sd99'"):
        doctor.report("sd99")


# --- TROUBLESHOOTING.md: every entry is backed by a doctor check or a test that exists -------------------------------

def _test_functions() -> set[str]:
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                names.add(f"{path.relative_to(ROOT)}::{node.name}")
    return names


def _entries() -> list[tuple[str, str]]:
    """(anchor, text) of each entry of TROUBLESHOOTING.md (an `<a id="...">` and what follows it)."""
    text = (ROOT / "TROUBLESHOOTING.md").read_text()
    parts = re.split(r'<a id="([\w-]+)"></a>', text)
    return list(zip(parts[1::2], parts[2::2]))


def test_troubleshooting_has_its_sections_and_every_entry_has_a_check():
    text = (ROOT / "TROUBLESHOOTING.md").read_text()
    for section in ("Install", "Loading", "Generation", "Training", "Drive"):
        assert re.search(rf"^## {section}\b", text, re.M), section
    tests = _test_functions()
    entries = _entries()
    assert len(entries) >= 15
    for anchor, body in entries:
        for field_name in ("Symptom", "Cause", "Fix", "Check"):
            assert f"**{field_name}**" in body, (anchor, field_name)
        check = body.split("**Check**", 1)[1]
        doctor_ids = re.findall(r"doctor check `([\w-]+)`", check)
        test_ids = re.findall(r"`(tests/test_\w+\.py::\w+)`", check)
        assert doctor_ids or test_ids, f"{anchor}: names no doctor check or test"
        for check_id in doctor_ids:
            assert check_id in doctor.CHECKS, f"{anchor}: no doctor check {check_id!r}"
        for node in test_ids:
            assert node in tests, f"{anchor}: no test {node}"
    anchors = [a for a, _ in entries]
    assert len(anchors) == len(set(anchors))
    assert set(doctor.CHECKS) <= set(anchors)  # every doctor finding's link lands on an entry


def test_errors_link_to_entries_that_exist():
    anchors = {a for a, _ in _entries()}
    for path in (ROOT / "helpers").rglob("*.py"):
        for anchor in re.findall(r"TROUBLESHOOTING\.md#([\w-]+)", path.read_text()):
            assert anchor in anchors, f"{path.name} links to a missing entry #{anchor}"
    assert "TROUBLESHOOTING.md" in (ROOT / "README.md").read_text()


def test_the_doctor_command_with_a_model(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env["HF_HOME"] = str(tmp_path)  # no stored login token either

    def run(*args):
        return subprocess.run([sys.executable, "-m", "helpers", "doctor", *args], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=120)

    result = run("--model", "sd3-medium")
    assert result.returncode == 0, result.stderr
    assert "[!] sd3-medium is gated and no hub token is set" in result.stdout
    assert "(see TROUBLESHOOTING.md#missing-token)" in result.stdout
    bad = run("--model", "sd99")
    assert bad.returncode == 2 and "error: `--model` must be a catalogue name, not 'sd99'" in bad.stderr


def test_the_driver_and_its_cuda_are_read_from_nvidia_smi_or_proc(monkeypatch, tmp_path):
    import types

    smi = ("| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |\n"
           "|   0  Tesla T4                       Off |   00000000:00:04.0 Off |                    0 |")
    monkeypatch.setattr(doctor, "NVIDIA_PROC", tmp_path / "missing")
    monkeypatch.setattr(doctor.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(doctor.subprocess, "run", lambda *a, **k: types.SimpleNamespace(stdout=smi))
    assert doctor._nvidia() == (True, "12.4")
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    assert doctor._nvidia() == (False, None)
    (tmp_path / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15")
    monkeypatch.setattr(doctor, "NVIDIA_PROC", tmp_path / "version")
    assert doctor._nvidia() == (True, None)  # a driver, but no nvidia-smi to say its CUDA


@pytest.mark.parametrize("notebook, extension, found", [
    ("6.5.7", "3.6.10", True), ("6.5.7", "3.6.7", True), ("6.5.7", "3.6.6", False), ("7.4.0", "3.6.10", False),
    ("6.5.7", "4.0.16", False), (None, "3.6.10", False)])
def test_widgets_output_in_notebook6(notebook, extension, found):
    e = env(Profile(platform="local", device="cpu", ram_gb=16.0, torch_version="2.13.0+cpu"),
            versions={"notebook": notebook, "widgetsnbextension": extension})
    findings = doctor.check_widgets_output(e)
    assert bool(findings) == found
    if found:
        assert "widgetsnbextension==3.6.6" in findings[0].fix and extension in findings[0].problem
