"""One-file checkpoints: the single `.safetensors` of A1111's models/Stable-diffusion folder and of Civitai.

`inspect(path)` tells what a file is from its header alone (8 bytes of length, then JSON: key names, shapes, dtypes;
no weight is read): a checkpoint (family sd15 / sd2 / sdxl, inpainting or not, the prediction type where the file says
it, parameters and bytes by component), a LoRA or an embedding. `load(path, task, dtype)` builds the pipeline with
diffusers' `from_single_file`, offline: the component configs come from assets/configs (the real architectures) or,
for a file of the kit's tiny test models, from their folders; the CLIP tokenizer from assets/tokenizers (the public
CLIP BPE merges, expanded into the cache on first use). No hub call is made.

    info = inspect("/content/drive/MyDrive/models/dreamshaper_8.safetensors")
    info.family, info.inpaint, info.params  ->  "sd15", False, 1066235307
"""
import gzip
import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CONFIGS = ASSETS / "configs"
CLIP_MERGES = ASSETS / "tokenizers" / "clip" / "merges.txt.gz"  # OpenAI CLIP's BPE (open_clip, MIT), 48,894 merges
CLIP_VOCAB_SIZE = 49408
HEADER_LIMIT = 100_000_000     # safetensors' own limit on a header's length
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# safetensors dtype -> bytes an element
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
               "F8_E5M2": "float8_e5m2"}

# the LDM/SGM prefix of each component (helpers.training.single_file writes the same layout)
PREFIXES = (("model.diffusion_model.", "unet"), ("first_stage_model.", "vae"), ("cond_stage_model.", "text_encoder"),
            ("conditioner.embedders.0.", "text_encoder"), ("conditioner.embedders.1.", "text_encoder_2"))
NOT_WEIGHTS = ("position_ids", "logit_scale")  # buffers the pipeline does not load

# diffusers' model type (infer_diffusers_model_type) -> (family, inpainting)
MODEL_TYPES = {"v1": ("sd15", False), "inpainting": ("sd15", True), "xl_base": ("sdxl", False),
               "xl_inpaint": ("sdxl", True), "v2": ("sd2", False), "inpainting_v2": ("sd2", True)}
# (family, inpainting) -> the config folders of the architectures that the kit knows for it
CONFIG_KEYS = {("sd15", False): "sd15", ("sd15", True): "sd15-inpaint", ("sd2", False): "sd2",
               ("sd2", True): "sd2-inpaint", ("sdxl", False): "sdxl", ("sdxl", True): "sdxl-inpaint"}
COMPONENTS = {"sd15": ("unet", "vae", "text_encoder"), "sd2": ("unet", "vae", "text_encoder"),
              "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}
PIPELINES = {("sd15", "txt2img"): "StableDiffusionPipeline", ("sd15", "img2img"): "StableDiffusionImg2ImgPipeline",
             ("sd15", "inpaint"): "StableDiffusionInpaintPipeline", ("sd2", "txt2img"): "StableDiffusionPipeline",
             ("sd2", "img2img"): "StableDiffusionImg2ImgPipeline", ("sd2", "inpaint"): "StableDiffusionInpaintPipeline",
             ("sdxl", "txt2img"): "StableDiffusionXLPipeline",
             ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline",
             ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline"}

LORA_MARKS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".hada_w1_a",
              ".lokr_w1", "lora_linear_layer.")
EMBEDDING_KEYS = ("emb_params", "clip_l", "clip_g", "string_to_param.*", "string_to_token")


class CheckpointFileError(ValueError):
    """A file that is not the checkpoint (or LoRA) it was given as: the message names the file and the fix."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    kind: str                      # "checkpoint", "lora", "embedding" or "unknown"
    family: str | None = None      # "sd15", "sd2" or "sdxl" (checkpoints)
    inpaint: bool = False          # a 9-channel inpainting UNet (image latents, mask, masked image)
    model_type: str | None = None  # diffusers' name for the layout ("v1", "xl_inpaint", ...)
    prediction: str | None = None  # "v_prediction" or "epsilon" where the file says so, else None (epsilon assumed)
    zero_snr: bool = False         # trained with zero terminal SNR (a `ztsnr` key)
    components: dict = field(default_factory=dict)  # unet/vae/text_encoder(_2) -> {"params", "bytes", "quantizable"}
    ignored: dict = field(default_factory=dict)     # what is in the file but not loaded: "model_ema", "other" -> bytes
    dtype: str = ""                # the dtype of most of its weight bytes
    metadata: dict = field(default_factory=dict)
    header_bytes: int = 0
    file_bytes: int = 0            # the size on disk
    data_bytes: int = 0            # the size the header promises (8 + header + tensors)
    keys: tuple = ()

    @property
    def complete(self) -> bool:
        return self.file_bytes >= self.data_bytes

    @property
    def task(self) -> str:
        return "inpaint" if self.inpaint else "txt2img"

    @property
    def params(self) -> int:
        return sum(c["params"] for c in self.components.values())

    @property
    def name(self) -> str:
        return Path(self.path).stem


def _pickle_refusal(path) -> CheckpointFileError:
    return CheckpointFileError(
        f"{str(path)!r} is a pickle checkpoint ({Path(path).suffix}): loading one can run any code its author put in "
        "it, so only .safetensors are loaded. Download the .safetensors version (Civitai and the hub offer one for "
        "most models), or, if you trust the source, convert it once: StableDiffusionPipeline.from_single_file(path)"
        ".save_pretrained(folder) (or the XL pipeline), then load the folder. See TROUBLESHOOTING.md#pickle-refused")


def read_header(path) -> tuple[dict, int, int]:
    """(header JSON, header length, file size) of a safetensors file: its first 8 + N bytes, nothing else."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"No file at {str(path)!r}: check the path (on Colab, mount Drive first with "
                                "helpers.storage.mount_drive(); Drive paths start /content/drive/MyDrive/).")
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder, not a checkpoint file: pass the .safetensors file itself "
                                "(or, for a diffusers model, a folder holding model_index.json).")
    size = path.stat().st_size
    fix = "Delete it and download or copy it again. See TROUBLESHOOTING.md#corrupt-safetensors"
    if size == 0:
        raise CheckpointFileError(f"{str(path)!r} is empty (0 bytes): a download or copy that did not finish. {fix}")
    with open(path, "rb") as f:
        head = f.read(8)
        if head.lstrip()[:1] == b"<":
            raise CheckpointFileError(f"{str(path)!r} is a web page (HTML), not a safetensors file: the link gave a "
                                      f"login or error page instead of the model. {fix}")
        if len(head) < 8:
            raise CheckpointFileError(f"{str(path)!r} is cut short ({size} bytes): not a safetensors file. {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > HEADER_LIMIT or n + 8 > size:
            raise CheckpointFileError(f"{str(path)!r} is cut short or not a safetensors file: its header would be "
                                      f"{n:,} bytes, and the file holds {size:,}. {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{str(path)!r} is not a safetensors file (its header is not safetensors' JSON). "
                                  f"{fix}")
    return header, n, size


def _kind(keys) -> str:
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or any(m in k for m in LORA_MARKS)
           for k in keys):
        return "lora"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
           for k in keys):
        return "checkpoint"
    if keys and all(k in EMBEDDING_KEYS or k.startswith("string_to_param.") for k in keys):
        return "embedding"
    return "unknown"


def _component(key: str) -> str | None:
    return next((comp for prefix, comp in PREFIXES if key.startswith(prefix)), None)


def _family(tensors: dict, model_type: str | None) -> tuple[str | None, bool]:
    """(family, inpainting) from the text encoders' prefixes and the UNet's input channels, the rules of diffusers'
    model types written by structure, so that they also hold for smaller models of the same layout (diffusers' SDXL
    test looks for OpenCLIP's 10th layer, which the kit's tiny models lack). A layout diffusers names and the kit does
    not load (SD3, FLUX, the SDXL refiner, Playground...) has no family."""
    if model_type not in MODEL_TYPES and model_type is not None:
        return None, False
    conv_in = tensors.get("model.diffusion_model.input_blocks.0.0.weight", {}).get("shape", [0, 0])
    inpaint = len(conv_in) > 1 and conv_in[1] == 9
    has = lambda prefix: any(k.startswith(prefix) for k in tensors)  # noqa: E731
    if has("conditioner.embedders.0.transformer.") and has("conditioner.embedders.1.model.") \
            and "model.diffusion_model.label_emb.0.0.weight" in tensors:
        return "sdxl", inpaint
    if has("cond_stage_model.model."):
        return "sd2", inpaint
    if has("cond_stage_model.transformer.") and has("model.diffusion_model."):
        return "sd15", inpaint
    return None, False


def inspect(path) -> CheckpointInfo:
    """What the safetensors file `path` is, from its header only (see CheckpointInfo). Raises FileNotFoundError,
    IsADirectoryError or CheckpointFileError (a ValueError) with the fix for a missing, empty, cut or HTML file."""
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES and path.is_file():
        raise _pickle_refusal(path)
    header, n, size = read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    tensors = {k: v for k, v in header.items() if isinstance(v, dict) and "shape" in v}
    end = max((v.get("data_offsets", [0, 0])[1] for v in tensors.values()), default=0)
    base = dict(path=str(path), metadata=metadata, header_bytes=n, file_bytes=size, data_bytes=8 + n + end,
                keys=tuple(tensors))
    kind = _kind(tensors)
    if kind != "checkpoint":
        return CheckpointInfo(kind=kind, **base)

    import torch
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    shapes = {k: torch.empty(v["shape"], device="meta") for k, v in tensors.items()}
    try:
        model_type = infer_diffusers_model_type(shapes)
    except (KeyError, IndexError, AttributeError, UnboundLocalError):
        model_type = None
    components, ignored, by_dtype = {}, {}, {}
    for key, v in tensors.items():
        start, stop = v.get("data_offsets", [0, 0])
        nbytes, numel = stop - start, 1
        for d in v["shape"]:
            numel *= d
        comp = _component(key)
        if comp is None or key.endswith(NOT_WEIGHTS) or key in ("v_pred", "ztsnr"):
            part = "model_ema" if key.startswith("model_ema.") else "other"
            ignored[part] = ignored.get(part, 0) + nbytes
            continue
        c = components.setdefault(comp, {"params": 0, "bytes": 0, "quantizable": 0, "fp32_in_fp16": 0})
        c["params"] += numel
        c["bytes"] += nbytes
        # the weights of Linear layers (what bitsandbytes quantizes): 2-D weights other than embeddings, OpenCLIP's
        # joined q/k/v, and the VAE's mid-block attention (1x1 convolutions here, Linear layers in diffusers)
        linear = (len(v["shape"]) == 2 and key.endswith(".weight") and "embedding" not in key) \
            or key.endswith("in_proj_weight") or (comp == "vae" and ".mid.attn_1." in key and key.endswith(
                (".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")))
        if linear:
            c["quantizable"] += numel
        by_dtype[v["dtype"]] = by_dtype.get(v["dtype"], 0) + nbytes
    family, inpaint = _family(tensors, model_type)
    declared = str(metadata.get("modelspec.prediction_type", "")).lower()
    prediction = ("v_prediction" if "v_pred" in tensors or declared in ("v", "v_prediction")
                  else "epsilon" if declared == "epsilon" else None)
    dtype = DTYPE_NAMES.get(max(by_dtype, key=by_dtype.get), "float32") if by_dtype else ""
    return CheckpointInfo(kind=kind, family=family, inpaint=inpaint, model_type=model_type, prediction=prediction,
                          zero_snr="ztsnr" in tensors, components=components, ignored=ignored, dtype=dtype, **base)


def check_checkpoint(info: CheckpointInfo) -> CheckpointInfo:
    """`info` where it is a one-file SD 1.x or SDXL checkpoint the kit can load (or plan), else a CheckpointFileError
    that says what the file is and what to do with it."""
    p = repr(info.path)
    if info.kind == "lora":
        raise CheckpointFileError(f"{p} is a LoRA, not a model checkpoint: load a base model with load_sd(...), then "
                                  f"this file with helpers.lora.load_lora(pipe, {p}) (or --lora on the command line).")
    if info.kind == "embedding":
        raise CheckpointFileError(f"{p} is a textual-inversion embedding, not a model checkpoint: load a base model, "
                                  f"then this file with helpers.lora.load_embedding(pipe, {p}).")
    if info.family is None:
        what = f"diffusers calls its layout {info.model_type!r}" if info.model_type else \
            f"its keys start {', '.join(sorted({k.split('.')[0] for k in info.keys})[:4])}"
        raise CheckpointFileError(f"{p} is not a Stable Diffusion 1.x, 2.x or SDXL checkpoint ({what}): one-file "
                                  "checkpoints of those load here; for other models use their diffusers folder or hub "
                                  "id (e.g. 'sd3-medium', 'flux-schnell').")
    missing = [c for c in COMPONENTS[info.family] if c not in info.components]
    if missing:
        raise CheckpointFileError(f"{p} holds no {' and no '.join(missing)} (a UNet-only or partial file): use the "
                                  "full checkpoint (UNet, VAE and text encoders in one file), as Civitai's "
                                  "'Checkpoint' downloads are.")
    return info


def check_lora(path) -> str:
    """Called where a LoRA is expected: raises CheckpointFileError where `path` is a whole model checkpoint or an
    embedding (header only); returns the kind otherwise ("lora", or "unknown" for a layout left to the LoRA loader)."""
    info = inspect(path)
    if info.kind == "checkpoint":
        what = info.family or info.model_type or "a model"
        raise CheckpointFileError(f"{info.path!r} is a whole model checkpoint ({what}), not a LoRA: load it as the "
                                  f"model, load_sd({info.path!r}) (or --model), and give a LoRA file here.")
    if info.kind == "embedding":
        raise CheckpointFileError(f"{info.path!r} is a textual-inversion embedding, not a LoRA: load it with "
                                  f"helpers.lora.load_embedding(pipe, {info.path!r}).")
    return info.kind


# --- configs and tokenizers --------------------------------------------------------------------------------------

def _matches(info: CheckpointInfo, folder: Path, shapes: dict) -> bool:
    """Whether the architecture configs in `folder` have the shapes the header has (a few telling tensors)."""
    def config(comp):
        path = folder / comp / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None

    unet, vae, te, te2 = config("unet"), config("vae"), config("text_encoder"), config("text_encoder_2")
    if unet is None or vae is None or te is None:
        return False
    checks = [("model.diffusion_model.input_blocks.0.0.weight",
               [unet["block_out_channels"][0], unet["in_channels"], 3, 3]),
              ("first_stage_model.encoder.conv_in.weight", [vae["block_out_channels"][0], 3, 3, 3])]
    token_embedding = {"sdxl": "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                       "sd2": "cond_stage_model.model.token_embedding.weight"}.get(
        info.family, "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
    checks.append((token_embedding, [te["vocab_size"], te["hidden_size"]]))
    if te2 is not None:
        checks.append(("conditioner.embedders.1.model.token_embedding.weight", [te2["vocab_size"],
                                                                               te2["hidden_size"]]))
    context = next((s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if context is not None and context[1] != unet["cross_attention_dim"]:
        return False
    return all(shapes.get(k) == v for k, v in checks)


def config_folder(info: CheckpointInfo) -> Path:
    """The folder of configs (model_index.json, unet/vae/text encoder configs, scheduler) whose architecture the
    checkpoint has: the real SD 1.5 / SD 2.x / SDXL (assets/configs) or, for a file of the kit's tiny test models,
    theirs."""
    check_checkpoint(info)
    key = CONFIG_KEYS[(info.family, info.inpaint)]
    header, _, _ = read_header(info.path)
    shapes = {k: v["shape"] for k, v in header.items() if isinstance(v, dict) and "shape" in v}
    candidates = [CONFIGS / key]
    real_width = json.loads((CONFIGS / key / "unet" / "config.json").read_text())["block_out_channels"][0]
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight", [0])
    if conv_in[0] != real_width:  # not the real architecture: perhaps the kit's own tiny model, saved as one file
        from . import tiny

        candidates.append(tiny.ensure(key))
    for folder in candidates:
        if _matches(info, folder, shapes):
            return folder
    raise CheckpointFileError(f"{info.path!r} looks like {info.family}{' inpainting' if info.inpaint else ''} but its "
                              f"shapes (UNet conv_in {conv_in}) match no architecture the kit has configs for: a "
                              "modified architecture; load it from its diffusers folder instead.")


def _cache_root() -> Path:
    from . import storage

    return storage.cache_root()


def clip_tokenizer_folder(pad_token: str = "<|endoftext|>") -> Path:
    """A folder with CLIP's real tokenizer (vocab.json, merges.txt, tokenizer_config.json), expanded from
    assets/tokenizers/clip/merges.txt.gz into the cache on first use. `pad_token`: "<|endoftext|>" (SD 1.x's and
    SDXL's first tokenizer, openai/clip-vit-large-patch14) or "!" (SDXL's second and SD 2.x's, OpenCLIP)."""
    from .tiny import _bytes_to_unicode

    digest = hashlib.sha1(CLIP_MERGES.read_bytes() + pad_token.encode()).hexdigest()[:10]
    target = _cache_root() / "tokenizers" / f"clip-{digest}"
    if (target / "tokenizer_config.json").is_file():
        return target
    lines = gzip.decompress(CLIP_MERGES.read_bytes()).decode("utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines[1:] if line]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".clip-", dir=target.parent))
    try:
        (staging / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
        (staging / "merges.txt").write_text("\n".join(lines) + "\n")
        (staging / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace",
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "pad_token": pad_token}))
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(clip_tokenizer_folder(pad_token))


# --- loading -----------------------------------------------------------------------------------------------------

def check_task(info: CheckpointInfo, task: str) -> None:
    if info.inpaint and task != "inpaint":
        raise ValueError(f"{info.path!r} is an inpainting checkpoint (a 9-channel UNet: it takes the image, the mask "
                         f"and the masked image), so it cannot do {task}: use task='inpaint' with it, or a "
                         f"{task} checkpoint of the same family for {task}.")


def _open_clip_encoder(path, folder: Path, dtype):
    """SDXL's second text encoder (OpenCLIP-G), read from the file's `conditioner.embedders.1.model.*` tensors by
    name. (diffusers' reader picks the embedder by width, which fails where both encoders have the same width.)"""
    import torch
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from diffusers.models.model_loading_utils import load_model_dict_into_meta
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    prefix = "conditioner.embedders.1.model."
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    with init_empty_weights():
        model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    state = convert_open_clip_checkpoint(model, tensors, prefix=prefix)
    load_model_dict_into_meta(model, state, dtype=dtype or torch.float32)
    return model.to(dtype or torch.float32).eval()


def load(path, task: str = "txt2img", dtype=None):
    """The diffusers pipeline for `task` ("txt2img", "img2img", "inpaint") of the one-file checkpoint `path`, in
    `dtype` (default float32), on the CPU, built offline (no hub call). An inpainting file loads for "inpaint" only;
    a plain one for all three. No safety checker (community checkpoints carry none). A file that declares
    v-prediction gets a scheduler that predicts v."""
    import diffusers
    import torch
    from safetensors import SafetensorError

    info = check_checkpoint(inspect(path))
    check_task(info, task)
    folder = config_folder(info)
    if not info.complete:
        raise CheckpointFileError(f"{info.path!r} is cut short: its header promises {info.data_bytes:,} bytes and the "
                                  f"file holds {info.file_bytes:,}. Delete it and download or copy it again. See "
                                  "TROUBLESHOOTING.md#corrupt-safetensors")
    dtype = dtype or torch.float32
    kwargs = {"config": str(folder), "local_files_only": True, "dtype": dtype}
    if not (folder / "tokenizer").is_dir():  # the real architectures: the real CLIP vocabulary, shipped in assets
        kwargs["tokenizer"] = clip_tokenizer("!" if info.family == "sd2" else "<|endoftext|>")  # OpenCLIP pads "!"
        if info.family == "sdxl":
            kwargs["tokenizer_2"] = clip_tokenizer("!")  # OpenCLIP's tokenizer pads with "!"
    if info.family == "sdxl":
        kwargs["text_encoder_2"] = _open_clip_encoder(info.path, folder, dtype)
    else:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    cls = getattr(diffusers, PIPELINES[(info.family, task)])
    try:
        pipe = cls.from_single_file(info.path, **kwargs)
    except SafetensorError as e:
        raise CheckpointFileError(f"{info.path!r} is damaged ({e}): delete it and download or copy it again. See "
                                  "TROUBLESHOOTING.md#corrupt-safetensors") from e
    prediction = info.prediction
    if prediction is None and info.family == "sd2" and not info.inpaint:
        # SD 2.x comes as 768 px v-prediction (2.0-v, 2.1) and 512 px epsilon (the -base models) with the same
        # tensors; as A1111 does, ask the UNet: it predicts v where it is v-trained, and the 512 px default follows
        prediction = "v_prediction" if predicts_v(pipe.unet) else "epsilon"
        if prediction == "epsilon":
            pipe.unet.register_to_config(sample_size=64)
    if prediction is not None and prediction != pipe.scheduler.config.get("prediction_type"):
        extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if info.zero_snr else {}
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction, **extra)
    return pipe


def predicts_v(unet) -> bool:
    """Whether an SD 2.x UNet was trained to predict v rather than the noise: A1111's test (modules/sd_models_config
    `is_using_v_parameterization_for_sd2`), an empirical one: one step on an 8x8 latent of 0.5s at t=999 with a
    context of 0.5s; where the output less the input averages below -1, the model predicts v. Milliseconds."""
    import torch

    param = next(unet.parameters())
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=param.dtype, device=param.device)
    latents = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        out = unet(latents, torch.tensor([999], device=param.device), encoder_hidden_states=context).sample
    return (out.float() - latents[:, :out.shape[1]].float()).mean().item() < -1
