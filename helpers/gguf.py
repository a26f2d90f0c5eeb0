"""GGUF denoiser files: the format many FLUX transformers on the hub and Civitai come in (Q8_0, Q4_K, ... weights).

`load_sd("flux1-dev-Q4_K_S.gguf")` loads the transformer from the file with diffusers' `GGUFQuantizationConfig` (it
stays quantized, each layer dequantized as it runs, in the runtime dtype) and the rest of the pipeline (VAE, text
encoders, scheduler) from the catalogue model the file belongs to, picked from its tensor names: FLUX.1-dev where it
has the guidance embedding, else FLUX.1-schnell (`inspect`). Only the header and tensor names are read to decide
that, never the weights. Needs the `gguf` package (`pip install gguf`).
"""
from dataclasses import dataclass
from pathlib import Path

SUFFIX = ".gguf"
INSTALL = "pip install gguf"


@dataclass(frozen=True)
class GGUFInfo:
    path: str
    family: str               # "flux"
    base: str                 # the catalogue model its other parts come from: "flux-dev" or "flux-schnell"
    quant_types: tuple        # the tensor types in the file, most common first: ("Q8_0", "F32")

    @property
    def precision(self) -> str:
        """What the planner is told the weights weigh: "4bit" for 2- to 6-bit types, "8bit" for Q8, else "none"."""
        main = self.quant_types[0] if self.quant_types else "F16"
        return "8bit" if main.startswith("Q8") else "none" if main in ("F32", "F16", "BF16") else "4bit"


def is_gguf(name) -> bool:
    return str(name).lower().endswith(SUFFIX)


def _reader(path):
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportError(f"Reading {str(path)!r} needs the gguf package: {INSTALL}") from e
    return GGUFReader


def _damaged(path, why: str) -> OSError:
    return OSError(f"{str(path)!r} is not a complete GGUF file ({why}): it was cut short or is not GGUF. Download it "
                   "again (TROUBLESHOOTING.md#gguf).")


def inspect(path) -> GGUFInfo:
    """What the GGUF file at `path` holds, from its header and tensor names. OSError naming the file where it is cut
    short or not GGUF; ValueError where it is not a FLUX transformer."""
    from collections import Counter

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No GGUF file at {str(path)!r}.")
    reader_cls = _reader(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise _damaged(path, "it does not start with the GGUF magic bytes")
    try:
        reader = reader_cls(str(path))
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors... on a file cut short
        raise _damaged(path, f"{type(e).__name__}: {e}") from e
    size = path.stat().st_size
    if any(t.data_offset + t.n_bytes > size for t in reader.tensors):
        raise _damaged(path, f"its tensors need more bytes than the file's {size}")
    names = [t.name.removeprefix("model.diffusion_model.") for t in reader.tensors]
    # BFL's original names (the usual GGUF layout) or diffusers' names
    if not any(n.startswith(("double_blocks.", "transformer_blocks.")) for n in names) or \
            not any(n.startswith(("single_blocks.", "single_transformer_blocks.")) for n in names):
        raise ValueError(f"{str(path)!r} is not a FLUX transformer GGUF (no double and single blocks among its "
                         f"{len(names)} tensors): only FLUX.1 GGUF files are supported.")
    dev = any(n.startswith(("guidance_in.", "time_text_embed.guidance_embedder.")) for n in names)
    weight = Counter()
    for t in reader.tensors:
        weight[t.tensor_type.name] += int(t.n_bytes)
    types = tuple(t for t, _ in weight.most_common())
    return GGUFInfo(path=str(path.resolve()), family="flux", base="flux-dev" if dev else "flux-schnell",
                    quant_types=types)


def load_transformer(info: GGUFInfo, base_source: str, dtype, revision: str | None = None):
    """The FLUX transformer of GGUF file `info`, its config from `base_source` (a hub id or folder with a
    `transformer/`), computing in `dtype`."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    _reader(info.path)
    return FluxTransformer2DModel.from_single_file(
        info.path, config=str(base_source), subfolder="transformer", config_revision=revision,
        quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), dtype=dtype)
