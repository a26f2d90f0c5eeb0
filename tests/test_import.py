import subprocess
import sys


def test_import_helpers_stays_light():
    code = ("import sys, helpers; heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate', "
            "'bitsandbytes', 'matplotlib') if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
