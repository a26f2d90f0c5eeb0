"""helpers: the thin package behind the llava-sd-notebooks notebooks.

`import helpers as h` stays light: torch, diffusers and transformers are imported inside the functions that use them.
"""
__version__ = "0.1.0"

from .runtime import Profile, SetupStop, detect_profile, pick_dtype, setup
from .smoke import cap, cap_size, is_tiny, use_tiny
from .storage import atomic_open, atomic_write, mount_drive, project_paths
from .registry import MODELS, resolve
from .loading import load_llava, load_sd
from .images import list_images, open_image, parameters_text, read_parameters, save_image
from .vlm import ChatSession, GenerationSettings, ask
from .captions import caption_folder, caption_image
from .reasoning import evaluate, reason
from .diffusion import generate
from .lora import load_lora
from . import masks

__all__ = [
    "ChatSession", "GenerationSettings", "MODELS", "Profile", "SetupStop", "ask", "atomic_open", "atomic_write",
    "cap", "cap_size", "caption_folder", "caption_image", "detect_profile", "evaluate", "generate", "is_tiny",
    "list_images", "load_llava", "load_lora", "load_sd", "masks", "mount_drive", "open_image", "parameters_text",
    "pick_dtype", "project_paths", "read_parameters", "reason", "resolve", "save_image", "setup", "use_tiny",
]
