"""Where we run: the platform (Colab, Kaggle, CI, local), the GPU profile, system RAM, the dtype policy, and setup()."""
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass

from . import smoke

GB = 1024**3


class SetupStop(RuntimeError):
    """Raised by setup() where a notebook cannot run here; its message starts with STOP and says what to do."""


@dataclass(frozen=True)
class Profile:
    platform: str                      # "colab" | "kaggle" | "ci" | "local"
    device: str                        # "cuda" | "mps" | "cpu"
    gpu_name: str | None = None        # e.g. "Tesla T4"
    vram_gb: float = 0.0               # total memory of GPU 0
    compute_capability: tuple[int, int] | None = None
    gpu_count: int = 0
    ram_gb: float = 0.0                # total system RAM
    torch_version: str | None = None   # None when torch is not installed

    @property
    def native_bf16(self) -> bool:
        """bf16 at full speed needs Ampere (compute capability 8.0) or newer; a T4 (7.5) emulates it slowly."""
        return self.device == "cuda" and self.compute_capability is not None and self.compute_capability >= (8, 0)

    @property
    def dtype_name(self) -> str:
        """The dtype policy: bf16 from compute capability 8.0 on, fp16 on older GPUs (T4) and MPS, fp32 on CPU."""
        if self.device == "cuda":
            return "bfloat16" if self.native_bf16 else "float16"
        return "float16" if self.device == "mps" else "float32"


def has_module(name: str) -> bool:
    """Whether `name` (dotted names too) can be imported, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def detect_platform(environ=os.environ) -> str:
    if "COLAB_RELEASE_TAG" in environ or "COLAB_GPU" in environ or has_module("google.colab"):
        return "colab"
    if "KAGGLE_KERNEL_RUN_TYPE" in environ or "KAGGLE_URL_BASE" in environ:
        return "kaggle"
    if environ.get("CI", "").lower() in ("1", "true", "yes"):
        return "ci"
    return "local"


def _ram_gb() -> float:
    import psutil

    return psutil.virtual_memory().total / GB


def detect_profile() -> Profile:
    """Read the machine: platform, GPU (through torch, when installed), RAM."""
    platform, ram = detect_platform(), _ram_gb()
    if not has_module("torch"):
        return Profile(platform=platform, device="cpu", ram_gb=ram)
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Profile(platform=platform, device="cuda", gpu_name=props.name, vram_gb=props.total_memory / GB,
                       compute_capability=(props.major, props.minor), gpu_count=torch.cuda.device_count(),
                       ram_gb=ram, torch_version=torch.__version__)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return Profile(platform=platform, device="mps", gpu_name="Apple MPS", ram_gb=ram,
                       torch_version=torch.__version__)
    return Profile(platform=platform, device="cpu", ram_gb=ram, torch_version=torch.__version__)


def pick_dtype(profile: Profile | None = None):
    """The torch dtype of the dtype policy for `profile` (detected when not given)."""
    import torch

    return getattr(torch, (profile or detect_profile()).dtype_name)


def describe(profile: Profile, storage_line: str | None = None) -> str:
    """The one line setup() prints."""
    if profile.device == "cuda":
        cc = ".".join(map(str, profile.compute_capability or ()))
        count = f"{profile.gpu_count}x " if profile.gpu_count > 1 else ""
        gpu = (f"GPU {count}{profile.gpu_name} {profile.vram_gb:.1f} GB (cc {cc}, "
               f"{'native bf16' if profile.native_bf16 else 'no native bf16'})")
    elif profile.device == "mps":
        gpu = "GPU Apple MPS"
    else:
        gpu = "no GPU"
    parts = [profile.platform, gpu, f"RAM {profile.ram_gb:.1f} GB", f"dtype {profile.dtype_name}"]
    if storage_line:
        parts.append(storage_line)
    if smoke.is_tiny():
        parts.append(f"SMOKE MODE ({smoke.NOISE_NOTICE})")
    return " | ".join(parts)


def check(profile: Profile) -> None:
    """Raise SetupStop, with what to do, where a notebook cannot run on `profile`."""
    if profile.torch_version is None:
        raise SetupStop("STOP: torch is not installed. Run `bash colab_setup.sh` in the project folder, "
                        "then run this cell again.")
    if profile.device != "cpu" or smoke.is_tiny():
        return
    if profile.platform == "colab":
        raise SetupStop("STOP: this Colab session has no GPU. Runtime > Change runtime type > Hardware accelerator: "
                        "T4 GPU > Save, then run the notebook again from the top.")
    if profile.platform == "kaggle":
        raise SetupStop("STOP: this Kaggle session has no GPU. Settings > Accelerator > GPU T4 x2 (phone "
                        "verification needed), then run the notebook again from the top.")
    raise SetupStop("STOP: no GPU here, and the real models need one. For a smoke run on tiny random-weight models, "
                    "set HELPERS_TINY=1 (or call helpers.use_tiny() before setup()); otherwise use a machine with "
                    "a CUDA GPU.")


def quiet_logging() -> None:
    """Keep notebook output readable: library warnings that do not concern the user are silenced."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers and diffusers set their loggers' level from these when first imported (setLevel before that
    # is overwritten); set your own value to see more.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("transformers", "diffusers", "accelerate", "huggingface_hub", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def silence_progress_bars() -> None:
    """No "Loading weights"/"Writing model shards" bars: for the tiny models, whose loading takes no time.
    (Real downloads keep their bars: a 4 GB download needs one.)"""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def setup(mount: bool = True, profile: Profile | None = None) -> Profile:
    """Detect the runtime, mount Drive (or fall back to a local folder), print one line, stop where we cannot run."""
    from . import storage

    quiet_logging()
    profile = profile or detect_profile()
    try:
        check(profile)
    except SetupStop:
        print(describe(profile))
        raise
    print(describe(profile, f"files {storage.mount_drive()}" if mount else None))
    return profile


PEFT_TORCHAO_MINIMUM = "0.16.0"   # peft 0.21's TORCHAO_MINIMUM_VERSION


def ignore_old_torchao() -> None:
    """Workaround, narrowly (peft 0.21.2): peft raises `ImportError: Found an incompatible version of torchao. Found
    version 0.10.0, but only versions above 0.16.0 are supported` on EVERY LoRA it injects (training, and diffusers'
    load_lora_weights) wherever a torchao older than that is installed, and Colab's image ships torchao 0.10.0
    (measured by .ci/colab_stack). Nothing here uses torchao, so where such an old one is present peft is told it is
    absent; a torchao peft supports is left alone. Call before peft injects an adapter."""
    import importlib.metadata as metadata

    from packaging.version import Version

    try:
        if Version(metadata.version("torchao")) >= Version(PEFT_TORCHAO_MINIMUM):
            return
    except metadata.PackageNotFoundError:
        return
    import peft.import_utils
    import peft.tuners.lora.torchao
    import peft.utils.quantization_utils

    def absent() -> bool:
        return False

    for module in (peft.import_utils, peft.tuners.lora.torchao, peft.utils.quantization_utils):
        if hasattr(module, "is_torchao_available"):
            module.is_torchao_available = absent

