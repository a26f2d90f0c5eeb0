"""`python -m helpers doctor`: each known cause of a broken Colab run, checked from facts about this machine.

`gather()` reads the facts once (GPU, torch build, driver, packages, RAM, Drive, hub token) into an `Environment`;
each `check_*` function looks at an Environment and returns its findings (problem, cause, fix, and the anchor of its
entry in TROUBLESHOOTING.md). Tests build an Environment by hand, so every check runs without the hardware it is about.
"""
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from . import runtime

DIST = "llava-sd-notebooks"
TROUBLESHOOTING = "TROUBLESHOOTING.md"
SHOWN_VERSIONS = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "huggingface_hub",
                  "safetensors", "ipywidgets")
RAM_OVERHEAD_GIB = 2.0   # Python, the libraries and the CUDA context, beside the weights
NVIDIA_PROC = Path("/proc/driver/nvidia/version")   # present where an NVIDIA driver is loaded


@dataclass(frozen=True)
class Finding:
    check: str      # the check's id: also its anchor in TROUBLESHOOTING.md
    problem: str
    cause: str
    fix: str

    @property
    def anchor(self) -> str:
        return f"{TROUBLESHOOTING}#{self.check}"

    def __str__(self) -> str:
        return f"{self.problem}. Cause: {self.cause}. Fix: {self.fix} (see {self.anchor})"


@dataclass
class Environment:
    """What the checks look at; `gather()` reads it from this machine."""
    profile: runtime.Profile
    bf16_claimed: bool = False            # torch.cuda.is_bf16_supported()
    torch_cuda: str | None = None         # torch.version.cuda: None for a CPU build of torch
    nvidia_gpu: bool = False              # an NVIDIA driver is present (nvidia-smi or /proc/driver/nvidia)
    driver_cuda: str | None = None        # the newest CUDA the driver supports (nvidia-smi's "CUDA Version")
    versions: dict = field(default_factory=dict)        # distribution name -> installed version (None: missing)
    import_errors: dict = field(default_factory=dict)   # module -> the error importing it raised (installed ones)
    xformers_torch: str | None = None     # the torch version the installed xformers was built for
    drive_mounted: bool = True
    model: str | None = None              # `doctor --model NAME`
    token: bool = False                   # a hub token is set (HF_TOKEN, the Colab secret, or `hf auth login`)
    offline: bool = False
    version_problems: list = field(default_factory=list)  # (name, installed or None, tested range)
    folders: dict = field(default_factory=dict)  # HELPERS_HOME / HELPERS_CACHE -> why it cannot hold files (if so)


# --- reading the machine ------------------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_error(module: str) -> str | None:
    """The error importing an installed `module` raises (None where it imports, or is not installed)."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        importlib.import_module(module)
    except Exception as e:  # a broken build raises anything from OSError to RuntimeError
        return f"{type(e).__name__}: {str(e)[:120]}"
    return None


def _nvidia() -> tuple[bool, str | None]:
    """(an NVIDIA driver is present, the newest CUDA version it supports)."""
    present = NVIDIA_PROC.exists()
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=15).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        match = re.search(r"CUDA Version:\s*([\d.]+)", out)
        return present or bool(match), match.group(1) if match else None
    return present, None


def _xformers_torch() -> str | None:
    """The torch version xformers' wheel requires (its builds pin one exactly), from its metadata."""
    for line in importlib.metadata.requires("xformers") or []:
        match = re.match(r"torch\s*==\s*([\w.+]+)", line)
        if match:
            return match.group(1)
    return None


def version_problems() -> list[tuple[str, str | None, str]]:
    """(name, installed version or None, tested range) of each dependency outside the ranges in pyproject.toml."""
    from packaging.requirements import Requirement

    try:
        requires = importlib.metadata.requires(DIST) or []
    except importlib.metadata.PackageNotFoundError:
        return [(DIST, None, "")]
    problems = []
    for line in requires:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        have = _version(req.name)
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            problems.append((req.name, have, str(req.specifier)))
    return problems


def folder_problem(path) -> str | None:
    """Why the kit cannot write into the folder `path` (made on first use), or None: it, or the nearest path above
    it that exists, is a file or is read-only."""
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return "is a file, not a folder" if existing == path else f"is below {str(existing)!r}, a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return "is read-only" if existing == path else f"is below {str(existing)!r}, a read-only folder"
    return None


def folder_problems() -> dict[str, str]:
    """{variable: "HELPERS_HOME='/x' is read-only"} for each of HELPERS_HOME and HELPERS_CACHE that is set to a folder
    the kit cannot write into."""
    from . import storage

    problems = {}
    for variable in (storage.ENV_HOME, storage.ENV_CACHE):
        value = os.environ.get(variable)
        problem = folder_problem(value) if value else None
        if problem:
            problems[variable] = f"{variable}={value!r} {problem}"
    return problems


def gather(model: str | None = None) -> Environment:
    """The facts of this machine that the checks need."""
    from huggingface_hub import get_token

    profile = runtime.detect_profile()
    env = Environment(profile=profile, model=model, token=bool(get_token()),
                      offline=os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"),
                      versions={d: _version(d) for d in SHOWN_VERSIONS + ("xformers", "torchvision", "notebook",
                                                                          "widgetsnbextension")},
                      drive_mounted=Path("/content/drive/MyDrive").is_dir(), version_problems=version_problems(),
                      folders=folder_problems())
    env.nvidia_gpu, env.driver_cuda = _nvidia()
    if profile.torch_version is not None:
        import torch

        env.torch_cuda = torch.version.cuda
        env.bf16_claimed = profile.device == "cuda" and torch.cuda.is_bf16_supported()
    modules = ["torchvision"] + (["bitsandbytes"] if profile.device == "cuda" else [])
    env.import_errors = {m: e for m in modules if (e := _import_error(m))}
    if env.versions.get("xformers"):
        env.xformers_torch = _xformers_torch()
    return env


# --- the checks: each looks at an Environment and returns its findings -----------------------------------------------

def check_no_gpu(env: Environment) -> list[Finding]:
    if env.profile.device != "cpu":
        return []
    return [Finding("no-gpu", "no GPU: the real models need one", "this runtime has no CUDA GPU (or torch cannot see "
                    "it)", "on Colab: Runtime > Change runtime type > T4 GPU, then run the notebook again. Here, "
                    "HELPERS_TINY=1 runs everything on tiny offline models")]


def check_bf16_on_t4(env: Environment) -> list[Finding]:
    p = env.profile
    if p.device != "cuda" or not env.bf16_claimed or p.native_bf16:
        return []
    cc = ".".join(map(str, p.compute_capability or ()))
    return [Finding("bf16-on-t4", f"torch says bf16 is supported on this {p.gpu_name} (compute capability {cc})",
                    "bf16 runs at full speed only from compute capability 8.0 (Ampere); here it is emulated, slowly",
                    "the helpers use float16 here; do not pass dtype=torch.bfloat16 or mixed_precision='bf16'")]


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split(".")[:2] if x.isdigit())


def check_torch_cuda(env: Environment) -> list[Finding]:
    if not env.nvidia_gpu or env.profile.torch_version is None:
        return []
    colab = env.profile.platform == "colab"
    restore = ("Runtime > Disconnect and delete runtime gives Colab's own torch back (never pip install torch on "
               "Colab)" if colab else "pip install torch==<version> --index-url https://download.pytorch.org/whl/cu"
               f"{(env.driver_cuda or '12.4').replace('.', '')[:3]} (a build for your driver's CUDA)")
    if env.torch_cuda is None:
        return [Finding("torch-cuda-mismatch", f"an NVIDIA GPU is here but torch {env.profile.torch_version} is a "
                        "CPU build", "a plain `pip install torch` (or a pinned version) replaced the CUDA build",
                        restore)]
    if env.driver_cuda and _major_minor(env.torch_cuda) > _major_minor(env.driver_cuda):
        return [Finding("torch-cuda-mismatch", f"torch {env.profile.torch_version} is built for CUDA "
                        f"{env.torch_cuda}, newer than the {env.driver_cuda} this NVIDIA driver supports",
                        "a torch wheel for a newer CUDA than the driver" + (
                            ": torch cannot use the GPU" if env.profile.device != "cuda" else ""), restore)]
    return []


def check_bitsandbytes(env: Environment) -> list[Finding]:
    if not env.versions.get("bitsandbytes"):
        return []
    if env.profile.device != "cuda":
        return [Finding("bitsandbytes-without-cuda", "bitsandbytes is installed but there is no CUDA GPU",
                        "its 4-bit loading (LLaVA on a T4) and 8-bit Adam need CUDA",
                        "nothing to do for a CPU run: the helpers load in 16/32 bit and train with AdamW here; for "
                        "4-bit LLaVA, use a GPU runtime")]
    error = env.import_errors.get("bitsandbytes")
    if error:
        return [Finding("bitsandbytes-without-cuda", "bitsandbytes does not load", f"{error} (a build without this "
                        "CUDA, or a broken install)", "pip install 'bitsandbytes==0.50.2', then restart the runtime")]
    return []


def check_xformers(env: Environment) -> list[Finding]:
    torch_version = (env.profile.torch_version or "").split("+")[0]
    if not env.versions.get("xformers") or not env.xformers_torch or not torch_version:
        return []
    if env.xformers_torch.split("+")[0] == torch_version:
        return []
    return [Finding("xformers-mismatch", f"xformers {env.versions['xformers']} is built for torch "
                    f"{env.xformers_torch}, but torch {env.profile.torch_version} is installed",
                    "its compiled kernels do not load against another torch; some installs also replace torch",
                    "pip uninstall -y xformers (the helpers use torch's own SDPA attention, as fast on a T4)")]


def check_torchvision(env: Environment) -> list[Finding]:
    error = env.import_errors.get("torchvision")
    if not error:
        return []
    return [Finding("torchvision-broken", "torchvision is installed but does not import", f"{error}: it is built for "
                    "another torch, and transformers' image processors then fail",
                    "pip uninstall -y torchvision (transformers falls back to its PIL processors), or install the "
                    "torchvision built for your torch")]


def check_widgets_output(env: Environment) -> list[Finding]:
    from packaging.version import Version

    notebook, extension = env.versions.get("notebook"), env.versions.get("widgetsnbextension")
    if not notebook or not extension or Version(notebook).major >= 7:
        return []
    if not Version("3.6.7") <= Version(extension) < Version("4"):
        return []
    return [Finding("widgets-output-notebook6", f"widgetsnbextension {extension} with the classic Notebook "
                    f"{notebook}: the panels show \"Error displaying widget\"",
                    "widgetsnbextension 3.6.7 to 3.6.10 cannot create an Output widget in Notebook 6 (the browser "
                    "console says \"_deserialize_state is not a function\"), and every panel holds one",
                    "pip install widgetsnbextension==3.6.6, then restart Jupyter and reload the page (or use "
                    "JupyterLab 4, or ipywidgets 8)")]


def check_ram(env: Environment) -> list[Finding]:
    """The weights of `env.model` against system RAM (on Colab free: 12.7 GB), in the precision it will load in."""
    from . import memory, registry

    ram = env.profile.ram_gb
    if not env.model or not ram:
        return []
    spec = registry.MODELS.get(env.model)
    if spec is None:
        return []
    precision = env.profile.dtype_name
    if spec.family != "llava_next" and env.profile.device == "cuda":
        # a pipeline on a GPU loads by the planner's route (4-bit, staged...), whose RAM peak it checked
        try:
            memory.sd_route(spec.name, precision, env.profile)
            return []
        except ValueError as e:
            return [Finding("low-ram", f"{spec.name} fits no loading route on this machine", str(e),
                            "use a smaller model (sd15, sdxl), a high-RAM runtime or a larger GPU")]
    if spec.family == "llava_next" and memory.choose_quantization(spec.name, env.profile) == "4bit":
        precision = "4bit"
    need = memory.weights_gib(spec.name, precision)
    if need + RAM_OVERHEAD_GIB <= ram:
        return []
    return [Finding("low-ram", f"{spec.name} in {precision} needs about {need:.1f} GiB of weights, and this machine "
                    f"has {ram:.1f} GiB of RAM", f"loading (and model CPU offload) holds the weights in RAM, plus "
                    f"about {RAM_OVERHEAD_GIB:.0f} GiB for Python and the libraries",
                    "use a smaller model (sd15, llava-1.6-mistral-7b in 4-bit), a high-RAM runtime, or free other "
                    "models first (del pipe; gc.collect(); torch.cuda.empty_cache())")]


def check_drive(env: Environment) -> list[Finding]:
    if env.profile.platform != "colab" or env.drive_mounted:
        return []
    return [Finding("drive-not-mounted", "Google Drive is not mounted", "outputs, captions and checkpoints go to "
                    "the runtime's own disk, which is wiped at disconnect", "run helpers.setup() (it mounts Drive) or "
                    "helpers.mount_drive(), and allow access when asked")]


def check_token(env: Environment) -> list[Finding]:
    from . import registry

    spec = registry.MODELS.get(env.model or "")
    if spec is None or not spec.gated or env.token:
        return []
    return [Finding("missing-token", f"{spec.name} is gated and no hub token is set", "the hub serves gated models "
                    "only to accounts that accepted the licence, with their token",
                    f"accept the licence on https://huggingface.co/{spec.repo_id}, then add your token as the Colab "
                    "secret HF_TOKEN (the key icon on the left; allow notebook access), or set the HF_TOKEN "
                    "environment variable. Never paste it into a notebook")]


def check_versions(env: Environment) -> list[Finding]:
    findings = []
    for name, have, tested in env.version_problems:
        if name == DIST:
            findings.append(Finding("versions", f"the {DIST} package is not installed", "the helpers are imported "
                                    "from the folder without being installed", "run `bash colab_setup.sh` in the "
                                    "project folder"))
        elif have is None:
            findings.append(Finding("versions", f"{name} is missing (tested: {tested})", "an incomplete install",
                                    "run `bash colab_setup.sh`"))
        else:
            findings.append(Finding("versions", f"{name} {have} is outside the tested range {tested}",
                                    "another install changed it, or it was installed without constraints.txt",
                                    f"pip install '{name}{tested}' (or `bash colab_setup.sh`)"))
    return findings


def check_folders(env: Environment) -> list[Finding]:
    what = {"HELPERS_HOME": "the project folder (outputs, datasets, models, runs)",
            "HELPERS_CACHE": "the cache of rebuildable files (the tiny models, tokenizers, file hashes)"}
    return [Finding("unusable-folder", problem, f"{variable} names {what.get(variable, 'a folder')}, and the kit "
                    "cannot write there", f"point {variable} at a folder you can write to (export {variable}=/path), "
                    f"or unset it for the default")
            for variable, problem in env.folders.items()]


CHECKS = {"no-gpu": check_no_gpu, "bf16-on-t4": check_bf16_on_t4, "torch-cuda-mismatch": check_torch_cuda,
          "bitsandbytes-without-cuda": check_bitsandbytes, "xformers-mismatch": check_xformers,
          "torchvision-broken": check_torchvision, "widgets-output-notebook6": check_widgets_output,
          "low-ram": check_ram, "drive-not-mounted": check_drive,
          "missing-token": check_token, "versions": check_versions,
          "unusable-folder": check_folders}


def run_checks(env: Environment) -> list[Finding]:
    """Every check's findings, in the order of CHECKS."""
    return [finding for check in CHECKS.values() for finding in check(env)]


def report(model: str | None = None) -> int:
    """Print the runtime line, the versions, the hub line and each finding with its fix."""
    from . import registry, storage

    if model is not None and model not in registry.MODELS:
        raise ValueError(f"`--model` must be a catalogue name, not {model!r}; known: {', '.join(registry.MODELS)}.")
    env = gather(model)
    print(runtime.describe(env.profile, f"files {storage.project_root()}"))
    print("versions: " + ", ".join(f"{d} {env.versions[d] or '(missing)'}" for d in SHOWN_VERSIONS))
    token = "a token is set" if env.token else ("no token (gated models such as sd3-medium and flux-dev need one: the "
                                                "Colab secret HF_TOKEN or the HF_TOKEN variable)")
    print(f"hub: {'offline (HF_HUB_OFFLINE=1)' if env.offline else 'online'}; {token}")
    findings = run_checks(env)
    for finding in findings:
        print(f"  [!] {finding}")
    print(f"{len(findings)} finding(s)." if findings else "No known problems found.")
    return 0
