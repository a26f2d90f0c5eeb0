"""Security checks over the source: no token in any file, no remote code, safetensors-only loading, pinned revisions."""
import ast
import re
import subprocess
from pathlib import Path

import pytest

from helpers import loading, registry

ROOT = Path(__file__).resolve().parents[1]
# Built from pieces, so that this file does not match its own patterns.
TOKEN_PATTERNS = {
    "Hugging Face token": re.compile(rb"\bhf_[A-Za-z0-9]{30,}"),
    "OpenAI-style key": re.compile(rb"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}"),
    "AWS access key": re.compile(rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "Google API key": re.compile(rb"\bAIza[0-9A-Za-z_-]{35}"),
}
REMOTE_CODE = re.compile(r"trust_remote_code\s*[=:]\s*True|[\"']trust_remote_code[\"']\s*:\s*True")
NON_WEIGHT_LOADERS = re.compile(r"(Tokenizer|Processor|Config|Scheduler)\w*$")  # text/JSON files only: no pickle


def project_files() -> list[Path]:
    """The files of the project: tracked by git, and new ones git does not ignore (notebooks included)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked archive): every file
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and not any(
            part.startswith((".venv", ".git", "__pycache__")) for part in p.relative_to(ROOT).parts)]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def find_tokens(data: bytes) -> list[str]:
    return [f"{kind}: {m.group()[:8].decode(errors='replace')}..." for kind, pattern in TOKEN_PATTERNS.items()
            for m in pattern.finditer(data)]


def test_the_token_scan_finds_each_kind_of_token():
    planted = b" ".join([b"hf_" + b"aB3" * 12, b"sk-" + b"x9Z" * 10, b"AKIA" + b"ABCD1234EFGH5678",
                         b"AIza" + b"Sy" + b"A1b2C3d4" * 4 + b"x", b"token = 'hf_hub_download'"])
    assert [f.split(":")[0] for f in find_tokens(planted)] == list(TOKEN_PATTERNS)


def test_no_file_holds_a_token():
    files = project_files()
    assert any(p.suffix == ".ipynb" for p in files) and any(p.name == "README.md" for p in files)
    found = {str(p.relative_to(ROOT)): hits for p in files if (hits := find_tokens(p.read_bytes()))}
    assert found == {}, f"tokens or keys in {found}: remove them and revoke them"


def _sources() -> list[Path]:
    return sorted((ROOT / "helpers").rglob("*.py")) + sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_remote_code_is_never_trusted():
    assert len(_sources()) > 20
    assert REMOTE_CODE.search("AutoModel.from_pretrained(x, trust_remote_code=True)")  # the pattern finds it
    offenders = [str(p.relative_to(ROOT)) for p in _sources() if REMOTE_CODE.search(p.read_text())]
    assert offenders == []


def _dict_keys_set_true(function: ast.AST, name: str) -> set[str]:
    """Keys a function sets to True in the dict `name`: `name = {"k": True, ...}` and `name["k"] = True`."""
    keys = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            if any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                keys |= {k.value for k, v in zip(node.value.keys, node.value.values)
                         if isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and v.value is True}
    return keys


def from_pretrained_without_safetensors(source: str) -> list[str]:
    """The from_pretrained calls in `source` that load weights without use_safetensors=True (directly, or in the
    **kwargs dict of the same function)."""
    tree = ast.parse(source)
    bad = []
    for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Module))]:
        for node in ast.walk(function):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained"):
                continue
            receiver = ast.unparse(node.func.value)
            if NON_WEIGHT_LOADERS.search(receiver):
                continue
            direct = any(k.arg == "use_safetensors" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
            spread = any(k.arg is None and isinstance(k.value, ast.Name)
                         and "use_safetensors" in _dict_keys_set_true(function, k.value.id) for k in node.keywords)
            if not (direct or spread):
                bad.append(f"line {node.lineno}: {ast.unparse(node)[:100]}")
    return sorted(set(bad))


def test_the_safetensors_scan_finds_a_call_without_it():
    assert from_pretrained_without_safetensors("def f():\n    UNet.from_pretrained('x', dtype=d)\n")
    assert not from_pretrained_without_safetensors("def f():\n    UNet.from_pretrained('x', use_safetensors=True)\n")
    assert not from_pretrained_without_safetensors(
        "def f():\n    kw = {'dtype': 1, 'use_safetensors': True}\n    Pipe.from_pretrained('x', **kw)\n")
    assert not from_pretrained_without_safetensors("def f():\n    AutoProcessor.from_pretrained('x')\n")


def test_every_weights_loader_in_helpers_is_safetensors_only():
    found = {str(p.relative_to(ROOT)): bad for p in sorted((ROOT / "helpers").rglob("*.py"))
             if (bad := from_pretrained_without_safetensors(p.read_text()))}
    assert found == {}


@pytest.fixture
def fake_specs(monkeypatch):
    """Catalogue entries pinned to a revision, outside SMOKE MODE, with from_pretrained recording what it was given
    (and stopping there: nothing is downloaded)."""
    import diffusers
    import transformers

    monkeypatch.setenv("HELPERS_TINY", "0")
    for spec in (registry.ModelSpec("pinned-sd", "owner/pinned-sd", "sd15", "txt2img", 1.0, "test", revision="abc123"),
                 registry.ModelSpec("pinned-sdxl", "owner/pinned-sdxl", "sdxl", "txt2img", 3.5, "test",
                                    revision="def456"),
                 registry.ModelSpec("pinned-llava", "owner/pinned-llava", "llava_next", "vlm", 7.0, "test",
                                    revision="0123abcd")):
        monkeypatch.setitem(registry.MODELS, spec.name, spec)
    calls = []

    class Stop(Exception):
        pass

    def recorder(owner):
        def from_pretrained(source, **kwargs):
            calls.append((owner, source, kwargs))
            if owner in ("vae", "processor"):
                return object()
            raise Stop

        return from_pretrained

    monkeypatch.setattr(diffusers.AutoPipelineForText2Image, "from_pretrained", recorder("pipe"))
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", recorder("vae"))
    monkeypatch.setattr(transformers.LlavaNextForConditionalGeneration, "from_pretrained", recorder("llava"))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", recorder("processor"))
    return calls, Stop


def test_the_registry_revision_is_passed_and_weights_are_safetensors(fake_specs):
    import torch

    from helpers.runtime import Profile

    calls, Stop = fake_specs
    cpu = Profile(platform="local", device="cpu", ram_gb=64.0, torch_version=torch.__version__)
    with pytest.raises(Stop):
        loading.load_sd("pinned-sd", profile=cpu)
    with pytest.raises(Stop):
        loading.load_sd("pinned-sdxl", dtype=torch.float16, profile=cpu)
    with pytest.raises(Stop):
        loading.load_llava("pinned-llava", profile=cpu)
    (_, sd_source, sd), vae, (_, sdxl_source, sdxl), (_, llava_source, llava) = calls
    assert (sd_source, sd["revision"], sd["use_safetensors"]) == ("owner/pinned-sd", "abc123", True)
    assert (sdxl_source, sdxl["revision"], sdxl["use_safetensors"]) == ("owner/pinned-sdxl", "def456", True)
    assert vae[0] == "vae" and vae[1] == registry.SDXL_FP16_VAE and vae[2]["use_safetensors"] is True
    assert (llava_source, llava["revision"], llava["use_safetensors"]) == ("owner/pinned-llava", "0123abcd", True)
    assert not any(kwargs.get("trust_remote_code") for _, _, kwargs in calls)


def test_an_unpinned_model_passes_no_revision(fake_specs, monkeypatch):
    import torch

    from helpers.runtime import Profile

    calls, Stop = fake_specs
    monkeypatch.setitem(registry.MODELS, "unpinned", registry.ModelSpec("unpinned", "owner/unpinned", "sd15",
                                                                        "txt2img", 1.0, "test"))
    with pytest.raises(Stop):
        loading.load_sd("unpinned", profile=Profile(platform="local", device="cpu", ram_gb=64.0,
                                                    torch_version=torch.__version__))
    assert "revision" not in calls[0][2] or calls[0][2]["revision"] is None
