"""Image quality measures: CLIP score (how well an image matches its prompt), and FID / KID (how close a set of
images is to a reference set), each computed the same way for every model of a benchmark.

CLIP score is 100 x the cosine similarity of a CLIP model's projected image and text embeddings, clipped at 0 (the
definition torchmetrics uses). It is computed here from a `transformers.CLIPModel` because torchmetrics' own CLIPScore
fails with transformers 5 (`'BaseModelOutputWithPooling' object has no attribute 'norm'`). FID and KID come from
torchmetrics with a feature extractor passed in as an `nn.Module`: by default `ClipFeatures`, the CLIP image
embeddings (FID in CLIP space, as Kynkaanniemi et al. 2023 recommend), so nothing is downloaded beyond the CLIP model;
torchmetrics' Inception features (`feature=2048`) need `pip install torch-fidelity` and download their weights.
Both are biased with few images: compare models on the same sets, and read small differences as noise.
(This module imports torch at once: `import helpers` does not import it.)
"""
import torch

from . import smoke

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # the CLIP torchmetrics' CLIPScore defaults to


def tiny_clip(seed: int = 0):
    """(model, processor) of a tiny random-weight CLIP (32 px images, 16-dim projections) for tests and SMOKE MODE."""
    import tempfile
    from pathlib import Path

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from . import tiny

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = CLIPTokenizer.from_pretrained(tiny.write_clip_tokenizer(Path(folder)))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_clip(name: str = DEFAULT_CLIP, device: str | None = None):
    """(model, processor) of a CLIP from the hub or a folder, in float32, on `device` (default: the runtime's). In
    SMOKE MODE the tiny random CLIP instead (its scores are noise)."""
    from transformers import CLIPModel, CLIPProcessor

    from . import runtime

    if smoke.is_tiny():
        model, processor = tiny_clip()
    else:
        try:
            model = CLIPModel.from_pretrained(name, use_safetensors=True).eval()
            processor = CLIPProcessor.from_pretrained(name)
        except OSError as e:
            raise OSError(f"Could not load the CLIP model {name!r} for the quality scores: {e}. Without network access "
                          "run with HELPERS_TINY=1, or pass quality=False.") from e
    return model.to(device or runtime.detect_profile().device), processor


def _pooled(output):
    """get_*_features returns a tensor in transformers 4 and an output object (pooler_output) in 5."""
    return getattr(output, "pooler_output", output)


def clip_embeddings(model, processor, images=None, texts=None):
    """(image embeddings, text embeddings), projected and L2-normalised; either may be None."""
    device = next(model.parameters()).device
    image_emb = text_emb = None
    with torch.no_grad():
        if images is not None:
            pixels = processor(images=list(images), return_tensors="pt")["pixel_values"].to(device, model.dtype)
            image_emb = _pooled(model.get_image_features(pixel_values=pixels)).float()
            image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        if texts is not None:
            tokens = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True).to(device)
            text_emb = _pooled(model.get_text_features(input_ids=tokens["input_ids"],
                                                      attention_mask=tokens["attention_mask"])).float()
            text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
    return image_emb, text_emb


def clip_score(images, prompts, model, processor) -> list[float]:
    """CLIP score of each (image, prompt) pair: 100 x max(cosine similarity, 0), in [0, 100]. Prompts longer than
    CLIP's 77 tokens are cut there (CLIP sees no more)."""
    images, prompts = list(images), [prompts] if isinstance(prompts, str) else list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"`images` and `prompts` must pair up, but there are {len(images)} images and "
                         f"{len(prompts)} prompts: pass one prompt per image.")
    if not images:
        return []
    image_emb, text_emb = clip_embeddings(model, processor, images, prompts)
    return (100 * (image_emb * text_emb).sum(-1)).clamp(min=0).cpu().tolist()


class ClipFeatures(torch.nn.Module):
    """A feature extractor for FID/KID: float images in [0, 1], (N, 3, H, W) -> their CLIP image embeddings."""

    def __init__(self, model, processor):
        super().__init__()
        self.model, self.processor = model, processor
        self.num_features = model.config.projection_dim  # torchmetrics reads it instead of running a dummy image

    def forward(self, images):
        arrays = [im.permute(1, 2, 0).float().cpu().numpy() for im in images]
        pixels = self.processor.image_processor(images=arrays, do_rescale=False, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            device = next(self.model.parameters()).device
            return _pooled(self.model.get_image_features(pixel_values=pixels.to(device, self.model.dtype))).float()


def to_tensor(images, size: int = 224):
    """Float images in [0, 1], (N, 3, size, size), from PIL images (resized) or such a tensor (returned as it is)."""
    import numpy as np

    if isinstance(images, torch.Tensor):
        return images.float()
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32) / 255)
                        .permute(2, 0, 1) for im in images])


def _feature(feature):
    if feature is None:
        return ClipFeatures(*load_clip())
    if isinstance(feature, int):
        import importlib.util

        if importlib.util.find_spec("torch_fidelity") is None:
            raise ImportError(f"feature={feature} asks for torchmetrics' Inception features, which need torch-fidelity "
                              "(and download their weights): pip install torch-fidelity; or pass an nn.Module, such "
                              "as quality.ClipFeatures(*quality.load_clip()).")
        return feature
    if not isinstance(feature, torch.nn.Module):
        raise TypeError(f"`feature` must be an nn.Module (images -> features), an int (Inception) or None (CLIP), "
                        f"not {type(feature).__name__}.")
    return feature


def _check_sets(real, fake, least: int) -> None:
    for name, images in (("real", real), ("fake", fake)):
        if len(images) < least:
            raise ValueError(f"`{name}` holds {len(images)} image(s); FID and KID need at least {least} on each "
                             "side (and hundreds to be reliable).")


def fid(real, fake, feature=None, size: int = 224) -> float:
    """Frechet distance between the feature statistics of `real` and `fake` (PIL lists or (N, 3, H, W) tensors in
    [0, 1]); 0 for identical sets. `feature`: an nn.Module (default: ClipFeatures) or 2048 for Inception."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_sets(real, fake, 2)
    metric = FrechetInceptionDistance(feature=_feature(feature), normalize=True)
    metric.update(to_tensor(real, size), real=True)
    metric.update(to_tensor(fake, size), real=False)
    return float(metric.compute())


def kid(real, fake, feature=None, subset_size: int | None = None, subsets: int = 50, size: int = 224,
        seed: int = 0) -> tuple[float, float]:
    """(mean, standard deviation) of the Kernel Inception Distance over `subsets` random subsets of `subset_size`
    images (default: the smaller set); unbiased, so about 0 (either sign) for sets from one distribution."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_sets(real, fake, 2)
    subset_size = subset_size or min(len(real), len(fake))
    metric = KernelInceptionDistance(feature=_feature(feature), subsets=subsets, subset_size=subset_size,
                                     normalize=True)
    metric.update(to_tensor(real, size), real=True)
    metric.update(to_tensor(fake, size), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the subsets are drawn at random: the same seed, the same value
        mean, std = metric.compute()
    return float(mean), float(std)
