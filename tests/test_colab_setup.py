"""colab_setup.sh, run against a stand-in Python: it fakes google.colab and torch as asked, records what pip is told
to install, and sees no installed packages (python -S), so every step of the script is exercised without
installing anything."""
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
# $FAKE: folder of fake modules and the pip log
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "pip ${@:3}" >> "$FAKE/pip.log"
  while [ $# -gt 0 ]; do
    if [ "$1" = "-c" ]; then echo "constraints $(grep -v '^#' "$2" | tr '\\n' ' ')" >> "$FAKE/pip.log"; fi
    case "$1" in torch==*) mkdir -p "$FAKE/mods/torch"; echo '__version__ = "2.13.0+cpu"' > "$FAKE/mods/torch/__init__.py";; esac
    shift
  done
  exit "${FAKE_PIP_RC:-0}"
fi
PYTHONPATH="$FAKE/mods:$REPO" exec "$REAL_PYTHON" -S "$@"
"""


@pytest.fixture
def fake(tmp_path):
    (tmp_path / "mods").mkdir()
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def run_setup(fake, colab=False, torch=None, torch_dist=None, **env):
    """torch: the fake torch's __version__; torch_dist: the version its package metadata says (a dist-info beside it),
    None for none."""
    if colab:
        (fake / "mods" / "google" / "colab").mkdir(parents=True)
        (fake / "mods" / "google" / "colab" / "__init__.py").write_text("")
    if torch:
        (fake / "mods" / "torch").mkdir()
        (fake / "mods" / "torch" / "__init__.py").write_text(f"__version__ = {torch!r}")
    if torch_dist:
        info = fake / "mods" / f"torch-{torch_dist}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_dist}\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("COLAB")}
    environ.update(PYTHON=str(fake / "python"), FAKE=str(fake), REAL_PYTHON=sys.executable, REPO=str(ROOT), **env)
    result = subprocess.run(["bash", str(ROOT / "colab_setup.sh")], capture_output=True, text=True, env=environ,
                            timeout=120)
    log = (fake / "pip.log").read_text() if (fake / "pip.log").exists() else ""
    return result, log


def test_on_colab_installs_only_what_is_missing_and_pins_colab_torch(fake):
    result, log = run_setup(fake, colab=True, torch="2.8.0+cu126")
    assert result.returncode == 0, result.stderr
    assert "colab: yes" in result.stdout and "torch 2.8.0+cu126 present: left as it is" in result.stdout
    calls = [line for line in log.splitlines() if line.startswith("pip ")]
    assert len(calls) == 1 and calls[0].endswith(f"-e {ROOT}")  # the package without its test extras
    constraints = " ".join(line for line in log.splitlines() if line.startswith("constraints"))
    assert "torch==2.8.0+cu126" in constraints and "diffusers==0.42.1" in constraints
    assert "ipywidgets" not in constraints and "nbval" not in constraints and "scipy" not in constraints


def test_elsewhere_installs_cpu_torch_first_then_the_package_with_tests(fake):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has a GPU: the script would choose the CUDA build")
    result, log = run_setup(fake)
    assert result.returncode == 0, result.stderr
    calls = [line for line in log.splitlines() if line.startswith("pip ")]
    assert calls[0] == "pip install -q torch==2.13.0"
    assert calls[1].endswith(f"-e {ROOT}[test]")
    assert "torch==2.13.0+cpu" in log and "nbval==0.11.0" in log


def test_a_failing_step_is_named_and_exits_non_zero(fake):
    result, _ = run_setup(fake, torch="2.13.0+cpu", FAKE_PIP_RC="1")
    assert result.returncode == 1
    assert "[setup] FAILED at step: pip install (" in result.stderr


@pytest.mark.parametrize("version, dist", [("2.11.0+cu130", "2.11.0"),      # PyPI's CUDA wheels: no label in metadata
                                           ("2.13.0+cpu", "2.13.0+cpu"),    # the CPU index's: the label in both
                                           ("2.5.1+rocm6.2", "2.5.1+rocm6.2"), ("2.12.0", "2.12.0")])
@pytest.mark.parametrize("colab", [True, False])
def test_torch_is_pinned_by_the_version_pip_sees(fake, version, dist, colab):
    """The pin must match the installed distribution, or pip fails with ResolutionImpossible (FACTS.md)."""
    result, log = run_setup(fake, colab=colab, torch=version, torch_dist=dist)
    assert result.returncode == 0, result.stderr
    assert f"torch {version} present: left as it is" in result.stdout
    constraints = " ".join(line for line in log.splitlines() if line.startswith("constraints"))
    assert f"torch=={dist} " in constraints + " "
    assert not any(line.startswith("pip install -q torch") for line in log.splitlines())
