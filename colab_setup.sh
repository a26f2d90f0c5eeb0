#!/usr/bin/env bash
# Installs what this project needs, and nothing it already has:   bash colab_setup.sh
#  - On Colab: only what Colab lacks, pinned (constraints.txt), and this package. Colab's torch is never touched.
#  - Elsewhere: torch where none is present (torch==2.13.0, the CPU build, where there is no CUDA GPU), then this
#    package with its test extras, pinned.
# Idempotent: when nothing is missing it says so and installs nothing. A failing step is named, with exit code 1.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
STEP="start"
say() { echo "[setup] $*"; }
trap 'echo "[setup] FAILED at step: $STEP. Read the error above, fix it, and run bash colab_setup.sh again." >&2; exit 1' ERR
PINS="$(mktemp)"; TORCH_PIN="$(mktemp)"
trap 'rm -f "$PINS" "$TORCH_PIN"' EXIT
start=$(date +%s)

STEP="detect the platform"
ON_COLAB=0
if [ -n "${COLAB_RELEASE_TAG:-}" ] || "$PYTHON" -c "import google.colab" >/dev/null 2>&1; then ON_COLAB=1; fi
say "python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])') at $(command -v "$PYTHON"); colab: $([ $ON_COLAB = 1 ] && echo yes || echo no)"

STEP="torch"
TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [ -n "$TORCH_VERSION" ]; then
  say "torch $TORCH_VERSION present: left as it is"
elif [ $ON_COLAB = 1 ]; then
  say "this Colab runtime has no torch: Runtime > Disconnect and delete runtime, then run again"; false
else
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then SPEC="torch>=2.4,<2.15"; else SPEC="torch==2.13.0"; fi
  say "installing $SPEC"
  "$PYTHON" -m pip install -q "$SPEC"
  TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null)"  # (numpy is not there yet: torch warns)
fi
# pip may not replace the torch we have, whatever another package asks for. Pinned by its package metadata, the
# version pip matches: PyPI's CUDA wheels say torch.__version__ == "2.11.0+cu130" but are the distribution "2.11.0"
# (a pin of the first matches nothing installed: ResolutionImpossible); the CPU index's keep "+cpu" in both.
TORCH_DIST="$(cd / && "$PYTHON" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)"
echo "torch==${TORCH_DIST:-$TORCH_VERSION}" > "$TORCH_PIN"

STEP="find what is missing"
# the pins that apply here: on Colab, not its own widgets and scipy, and not the test tools
if [ $ON_COLAB = 1 ]; then grep -vE '^(ipywidgets|scipy|nbval|pytest|hypothesis|sortedcontainers|jupyterlab|playwright)==' "$HERE/constraints.txt" > "$PINS"; else cp "$HERE/constraints.txt" "$PINS"; fi
MISSING="$(cd / && "$PYTHON" - "$PINS" "$ON_COLAB" <<'PY'
import importlib.metadata as md, re, sys
pins, on_colab = sys.argv[1], sys.argv[2] == "1"
def have(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
missing = []
for line in open(pins):
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        if have(name) != version:
            missing.append(line)
extras = [] if on_colab else ["ipykernel", "nbformat", "nbclient"]
missing += [n for n in extras if have(n) is None]
if have("llava-sd-notebooks") is None:
    missing.append("llava-sd-notebooks")
print(" ".join(missing))
PY
)"
if [ -z "$MISSING" ]; then
  say "nothing to install: every pinned package and this package are present"
else
  STEP="pip install ($MISSING)"
  say "installing: $MISSING"
  if [ $ON_COLAB = 1 ]; then TARGET="$HERE"; else TARGET="$HERE[test]"; fi
  "$PYTHON" -m pip install -q -c "$PINS" -c "$TORCH_PIN" -e "$TARGET"
fi

STEP="check the install"
(cd / && "$PYTHON" -c "import helpers, sys; assert 'torch' not in sys.modules; print('[setup] import helpers: ok,', helpers.__file__)")
say "done in $(( $(date +%s) - start )) s"
