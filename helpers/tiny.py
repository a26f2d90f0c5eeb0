"""Tiny random-weight checkpoints of each model family, for tests, CI and SMOKE MODE.

Each is built from a config of the real architecture (sizes shrunk to a few MB), seeded, and saved with
`save_pretrained` in the real folder layout, so it loads through the very `from_pretrained` code the real checkpoint
takes. Tokenizers are built offline too (a hand-written CLIP BPE; a trained Llama-style BPE for LLaVA).
Their outputs are noise: they prove code paths, never quality.

Built models are cached in HELPERS_CACHE (default ~/.cache/llava-sd-notebooks/tiny), in a folder named after the
key, the seed and a hash of this file and the library versions, so a change to a builder never serves a stale model.
"""
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

# Words the tiny CLIP tokenizer knows as whole tokens; any other text falls back to single bytes, as in real CLIP.
CLIP_WORDS = ("a photo of the cat dog painting portrait landscape castle watercolor lighthouse sunset astronaut "
              "riding horse red blue car rain woman man highly detailed bowl fruit on table sks in bucket sofa "
              "mountains lake at and with blurry low quality best masterpiece soft light style").split()

# Sentences the tiny LLaVA tokenizer is trained on.
LLAVA_CORPUS = ["What is shown in this image?", "Describe the image in detail.", "The image shows a cat on a sofa.",
                "Is there a dog? Yes, there is a dog.", "Explain step by step why the sky looks blue.",
                "A red car is parked in the rain.", "What color is it? It is red.",
                "A chat between a curious human and an artificial intelligence assistant."] * 3

# Chat templates modelled on the llava-hf LLaVA 1.6 processors (Mistral [INST], Vicuna USER/ASSISTANT, ChatML for
# the 34B). The real checkpoints ship their own; these give the tiny stand-ins the same prompt shapes.
_IMAGES_THEN_TEXT = ("{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
                     "{% endfor %}{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}"
                     "{{ c['text'] }}{% endfor %}")
CHAT_TEMPLATES = {
    "mistral": ("{% for message in messages %}{% if message['role'] == 'system' %}"
                "{{ message['content'][0]['text'] + '\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
                + _IMAGES_THEN_TEXT + "{{ ' [/INST]' }}{% else %}{{ ' ' }}" + _IMAGES_THEN_TEXT
                + "{{ '</s>' }}{% endif %}{% endfor %}"),
    "vicuna": ("{% for message in messages %}{% if message['role'] == 'system' %}"
               "{{ message['content'][0]['text'] + ' ' }}{% else %}{{ message['role'].upper() + ': ' }}"
               + _IMAGES_THEN_TEXT + "{{ ' ' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"),
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
               + _IMAGES_THEN_TEXT + "{{ '<|im_end|>\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
}

PINPOINTS = [[32, 64], [64, 32], [64, 64]]   # any-resolution grid of the tiny LLaVA (real: 336..1008 px)


def cache_dir() -> Path:
    from . import storage

    return storage.cache_root() / "tiny"


def _fingerprint() -> str:
    h = hashlib.sha1(Path(__file__).read_bytes())
    for dist in ("torch", "diffusers", "transformers", "tokenizers"):
        h.update(importlib.metadata.version(dist).encode())
    return h.hexdigest()[:10]


# --- CLIP tokenizer (the real SD layout: vocab.json + merges.txt) ---------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map of the 256 bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clip_merges(words) -> list[tuple[str, str]]:
    """BPE merges under which each word is one token. Built by running BPE itself (lowest-rank pair first, leftmost
    on ties) and adding a merge only where none applies: a plain left-to-right chain per word breaks as soon as two
    words share a pair ("horse" makes (h, o) early, and "photo" then splits into p/ho/t/o)."""
    merges, rank = [], {}
    for word in sorted(set(words)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            r, i = min((rank.get(pair, float("inf")), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
            if r == float("inf"):
                i = 0
                rank[(symbols[0], symbols[1])] = len(merges)
                merges.append((symbols[0], symbols[1]))
            symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return merges


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """vocab.json, merges.txt and tokenizer_config.json (the real SD layout) of a small CLIP BPE: the 512 byte-level
    tokens of real CLIP plus CLIP_WORDS as whole words."""
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = _clip_merges(CLIP_WORDS)
    vocab += [a + b for a, b in merges if a + b not in vocab]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    # model_max_length is essential: without it CLIPTokenizer pads to 1e30 (OverflowError: int too big to convert).
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token}))
    return folder


def _clip_tokenizer(tmp: Path, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, pad_token))


def _save_with_real_tokenizer_layout(pipe, folder: Path) -> None:
    """save_pretrained, then lay each CLIP tokenizer out as the real repos do (vocab.json + merges.txt), so loading
    goes through the same files as theirs (transformers 5 would save tokenizer.json instead)."""
    pipe.save_pretrained(folder)
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is not None and type(tok).__name__ == "CLIPTokenizer":
            shutil.rmtree(folder / name)
            write_clip_tokenizer(folder / name, tok.pad_token)


def _t5_tokenizer(model_max_length: int):
    """A Unigram T5 tokenizer (<pad>=0, </s>=1, <unk>=2): characters, and CLIP_WORDS as whole pieces."""
    from transformers import T5Tokenizer  # tokenizers-backed; T5TokenizerFast is the same class in transformers 5

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -10.0) for c in chars] + [("▁" + c, -9.0) for c in chars]
    vocab += [("▁" + w, -4.0) for w in sorted(set(CLIP_WORDS)) if len(w) > 1]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _t5_encoder(tok, d_model: int, d_kv: int = 8, d_ff: int = 37):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=0, tie_word_embeddings=False))


def _clip_text_config(tok, hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=projection,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _sd_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=32, sample_size=64)


def _flow_vae(scaling_factor: float, shift_factor: float):
    """The SD3/FLUX VAE: 16 latent channels, no quant convs, the real scaling and shift (real: x8; tiny: x2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 16],
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=scaling_factor,
                         shift_factor=shift_factor, latents_mean=None, latents_std=None, force_upcast=True,
                         use_quant_conv=False, use_post_quant_conv=False)


# --- Stable Diffusion 1.x ----------------------------------------------------------------------------------------

def _build_sd15(folder: Path, tmp: Path, in_channels: int = 4) -> None:
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = _clip_tokenizer(tmp)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    # the scheduler config of the real SD 1.5 repo
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              set_alpha_to_one=False, steps_offset=1)
    cls = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    pipe = cls(unet=unet, vae=_sd_vae(), text_encoder=CLIPTextModel(_clip_text_config(tok)), tokenizer=tok,
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    _save_with_real_tokenizer_layout(pipe, folder)


def _build_sd2(folder: Path, tmp: Path, in_channels: int = 4) -> None:
    """SD 2.x's layout in small: the tiny SD 1.5 UNet with linear projections, and an OpenCLIP-style text encoder
    (gelu, a tokenizer that pads with "!"), which a one-file checkpoint stores under cond_stage_model.model."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = _clip_tokenizer(tmp, pad_token="!")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon" if in_channels == 9 else "v_prediction")
    config = _clip_text_config(tok)
    config.hidden_act = "gelu"
    cls = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    pipe = cls(unet=unet, vae=_sd_vae(), text_encoder=CLIPTextModel(config), tokenizer=tok, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    _save_with_real_tokenizer_layout(pipe, folder)


# --- SDXL --------------------------------------------------------------------------------------------------------

def _build_sdxl(folder: Path, tmp: Path, in_channels: int = 4) -> None:
    from diffusers import (EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = _clip_tokenizer(tmp / "1")
    tok2 = _clip_tokenizer(tmp / "2", pad_token="!")  # the real tokenizer_2 pads with "!"
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x addition_time_embed_dim + te2 projection
        cross_attention_dim=64, norm_num_groups=32)       # te1 hidden 32 + te2 hidden 32
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    parts = dict(unet=unet, vae=_sd_vae(), text_encoder=CLIPTextModel(_clip_text_config(tok)),
                 text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(tok2)), tokenizer=tok, tokenizer_2=tok2,
                 scheduler=scheduler)
    if in_channels == 9:
        pipe = StableDiffusionXLInpaintPipeline(**parts, requires_aesthetics_score=False)
    else:
        pipe = StableDiffusionXLPipeline(**parts)
    _save_with_real_tokenizer_layout(pipe, folder)


# --- SD3 and FLUX (MMDiT transformers, flow matching, 16-channel VAE, a T5 text encoder) --------------------------

def _t5_sizes(width: int) -> dict:
    """T5 sizes at which every Linear's in_features is `width` or a multiple of it (4 heads of width / 4)."""
    return {"d_kv": 8, "d_ff": 37} if width == 32 else {"d_kv": width // 4, "d_ff": 2 * width}


def _build_sd3(folder: Path, tmp: Path, width: int = 32) -> None:
    """width 64: every quantized Linear (transformer, T5) has in_features a multiple of 64, which bitsandbytes' CPU
    4-bit kernels need (FACTS.md); the CLIP encoders, never quantized, stay at 32."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tok, tok2 = _clip_tokenizer(tmp / "1"), _clip_tokenizer(tmp / "2", pad_token="!")
    tok3 = _t5_tokenizer(256)
    t5_dim = 64  # the two CLIP hidden states (32 + 32) are concatenated and zero-padded to T5's width
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=width // 4,
        num_attention_heads=4, caption_projection_dim=width, joint_attention_dim=t5_dim, pooled_projection_dim=64,
        pos_embed_max_size=32)  # real: 96; 32 patches allow images up to 128 px here
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=_flow_vae(1.5305, 0.0609),  # the real SD3 VAE's scaling and shift
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        text_encoder=CLIPTextModelWithProjection(_clip_text_config(tok)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(tok2)), tokenizer_2=tok2,
        text_encoder_3=_t5_encoder(tok3, t5_dim, **_t5_sizes(width)), tokenizer_3=tok3)
    _save_with_real_tokenizer_layout(pipe, folder)


def _build_flux(folder: Path, tmp: Path, width: int = 32, dev: bool = False) -> None:
    """width 64: every Linear of the transformer and T5 has in_features a multiple of 64 (bitsandbytes' CPU 4-bit
    kernels need it, FACTS.md); the CLIP pooled output feeds the transformer, so CLIP is 64 wide too. dev: the
    guidance embedding and the scheduler of FLUX.1-dev (guidance-distilled); else FLUX.1-schnell's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tok, tok2 = _clip_tokenizer(tmp), _t5_tokenizer(512)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=width // 16, joint_attention_dim=width, pooled_projection_dim=width, guidance_embeds=dev,
        axes_dims_rope=(4, 4, 8))
    # the scheduler configs of FLUX.1-dev and FLUX.1-schnell
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0 if dev else 1.0, use_dynamic_shifting=dev, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, vae=_flow_vae(0.3611, 0.1159), scheduler=scheduler,
                        text_encoder=CLIPTextModel(_clip_text_config(tok, hidden=width, projection=width)),
                        tokenizer=tok, text_encoder_2=_t5_encoder(tok2, width, **_t5_sizes(width)), tokenizer_2=tok2)
    _save_with_real_tokenizer_layout(pipe, folder)


def write_gguf(key: str, path, qtype: str = "Q8_0", seed: int = 0) -> Path:
    """A GGUF file of the transformer of tiny FLUX model `key` (ensure(key, seed)), as the FLUX GGUFs of the hub are
    laid out: 2-D weights in `qtype` ("Q8_0", or "F16"/"F32"), the rest F32. Tensor names are diffusers' own, not
    BFL's originals: diffusers 0.42's BFL-to-diffusers converter hard-codes FLUX's real width (inner_dim = 3072), so
    a tiny file with BFL names cannot be loaded; diffusers loads a file whose names match the model without
    converting them."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    tensors = load_file(ensure(key, seed) / "transformer" / "diffusion_pytorch_model.safetensors")
    kind = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for name, array in sorted(tensors.items()):
        array = array.astype(np.float32)
        if array.ndim == 2 and kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        elif array.ndim == 2 and kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# --- LLaVA 1.6 (LLaVA-NeXT) ----------------------------------------------------------------------------------------

def _llava_tokenizer(chat_format: str):
    """A byte-fallback BPE with Metaspace pre-tokenisation (the Llama/Mistral style), trained on LLAVA_CORPUS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    bpe.train_from_iterator(LLAVA_CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                              show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = LlamaTokenizer(vocab=model["vocab"], merges=merges, model_max_length=4096, padding_side="left",
                         extra_special_tokens={"image_token": "<image>"}, add_bos_token=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    if chat_format == "chatml":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.eos_token = "<|im_end|>"
    return tok


def _build_llava(folder: Path, tmp: Path, chat_format: str) -> None:
    """Hidden sizes are multiples of 64, so that bitsandbytes' 4-bit path also runs on the CPU (FACTS.md)."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor, MistralConfig)

    tok = _llava_tokenizer(chat_format)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=64, hidden_act="quick_gelu")
    text_cls = MistralConfig if chat_format == "mistral" else LlamaConfig
    text = text_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(
        "<image>"), image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(32 // 8) ** 2, projector_hidden_act="gelu")
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    # The processor must agree with the model on patch size, feature strategy, pinpoints and image size, or
    # "Image features and image tokens do not match" is raised (FACTS.md).
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=PINPOINTS, do_pad=True)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATES[chat_format])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


# key -> builder(folder, tmp): the registry's ModelSpec.tiny names one of these keys
BUILDERS = {
    "sd15": _build_sd15,
    "sd15-inpaint": partial(_build_sd15, in_channels=9),
    "sd2": _build_sd2,
    "sd2-inpaint": partial(_build_sd2, in_channels=9),
    "sdxl": _build_sdxl,
    "sdxl-inpaint": partial(_build_sdxl, in_channels=9),
    "sd3": _build_sd3,
    "sd3-64": partial(_build_sd3, width=64),    # for 4-bit on the CPU (every quantized in_features % 64 == 0)
    "flux": _build_flux,
    "flux-64": partial(_build_flux, width=64),  # likewise
    "flux-dev": partial(_build_flux, dev=True),  # guidance-distilled, as FLUX.1-dev
    "flux-dev-64": partial(_build_flux, width=64, dev=True),
    "llava-next-mistral": partial(_build_llava, chat_format="mistral"),
    "llava-next-vicuna": partial(_build_llava, chat_format="vicuna"),
    "llava-next-chatml": partial(_build_llava, chat_format="chatml"),
}


def build(key: str, folder, seed: int = 0) -> Path:
    """Build the tiny model `key` with weights drawn from `seed` and save it into `folder`."""
    import torch

    from .runtime import silence_progress_bars

    if key not in BUILDERS:
        raise ValueError(f"No tiny model {key!r}; known: {', '.join(BUILDERS)}.")
    silence_progress_bars()
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="tiny-tok-") as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            BUILDERS[key](folder, Path(tmp))
    return folder


def ensure(key: str, seed: int = 0) -> Path:
    """The cached folder of the tiny model `key`, built on first use. A half-built folder is never left behind: the
    build goes to a temporary folder that is renamed into place when complete."""
    if key not in BUILDERS:
        raise ValueError(f"No tiny model {key!r}; known: {', '.join(BUILDERS)}.")
    target = cache_dir() / f"{key}-seed{seed}-{_fingerprint()}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        build(key, staging / "model", seed)
        try:
            os.rename(staging / "model", target)
        except OSError:  # another process finished the same build first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
