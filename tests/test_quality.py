"""helpers.quality: CLIP score against a hand computation on a tiny random CLIP; FID and KID through torchmetrics with
an injected feature extractor (offline), near zero for a set against itself and growing with noise."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import quality


@pytest.fixture(scope="module")
def clip():
    return quality.tiny_clip()


def pil_images(n, size=48, seed=0):
    rng = np.random.RandomState(seed)
    return [Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8")) for _ in range(n)]


class PixelStats(torch.nn.Module):
    """A feature extractor that sees noise: per-channel mean, standard deviation and mean absolute gradient."""

    num_features = 9

    def forward(self, images):
        grad = (images[..., 1:] - images[..., :-1]).abs().mean(dim=(2, 3))
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3)), grad], dim=1)


def smooth_images(n, seed=0):
    """n smooth images (a random colour gradient each), (n, 3, 32, 32) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, 32)
    start, slope = torch.rand(n, 3, 1, 1, generator=g) * 0.5, torch.rand(n, 3, 1, 1, generator=g) * 0.5
    return (start + slope * ramp.view(1, 1, 1, 32)).expand(n, 3, 32, 32).clone()


def noised(images, amount, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (images + amount * torch.randn(images.shape, generator=g)).clamp(0, 1)


def test_clip_score_is_100_times_the_cosine_of_the_projected_embeddings(clip):
    model, processor = clip
    images, prompts = pil_images(3), ["a red cat", "a dog on a box", "a photo"]
    scores = quality.clip_score(images, prompts, model, processor)
    assert len(scores) == 3 and all(0 <= s <= 100 for s in scores)
    # by hand: the vision and text towers, their projections, the cosine
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        text = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                      attention_mask=inputs["attention_mask"]).pooler_output)
    expected = (100 * torch.nn.functional.cosine_similarity(image, text, dim=-1)).clamp(min=0)
    assert scores == pytest.approx(expected.tolist(), abs=1e-3)
    assert quality.clip_score(images, prompts, model, processor) == scores  # deterministic


def test_clip_score_checks_pairs_and_cuts_long_prompts(clip):
    model, processor = clip
    with pytest.raises(ValueError, match="2 images and 1 prompts"):
        quality.clip_score(pil_images(2), ["one"], model, processor)
    (score,) = quality.clip_score(pil_images(1), ["a cat " * 100], model, processor)  # 200 words: cut at 77 tokens
    assert 0 <= score <= 100


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise():
    real = smooth_images(32)
    same = quality.fid(real, real.clone(), feature=PixelStats())
    a_little = quality.fid(real, noised(real, 0.05), feature=PixelStats())
    a_lot = quality.fid(real, noised(real, 0.3), feature=PixelStats())
    assert abs(same) < 1e-6  # tolerance: float64 round-off of the matrix square root
    assert a_lot > a_little > 1e-3 > abs(same)


def test_kid_is_about_zero_for_one_distribution_and_grows_with_noise():
    real, other = smooth_images(32, seed=0), smooth_images(32, seed=5)  # two draws of the same distribution
    same_mean, same_std = quality.kid(real, other, feature=PixelStats(), subset_size=16)
    noisy_mean, _ = quality.kid(real, noised(other, 0.3), feature=PixelStats(), subset_size=16)
    assert same_std >= 0 and abs(same_mean) < 0.01  # tolerance: unbiased estimate from 16-image subsets
    assert noisy_mean > 10 * max(abs(same_mean), 1e-3)
    assert quality.kid(real, other, feature=PixelStats(), subset_size=16) == (same_mean, same_std)  # seeded subsets


def test_fid_kid_on_pil_images_with_clip_features(clip):
    features = quality.ClipFeatures(*clip)
    images = pil_images(4, size=40)
    assert features(quality.to_tensor(images, 32)).shape == (4, 16)
    assert abs(quality.fid(images, images, feature=features, size=32)) < 1e-4
    with pytest.raises(ValueError, match="`fake` holds 1 image"):
        quality.fid(images, images[:1], feature=features)
    with pytest.raises(TypeError, match="`feature` must be an nn.Module"):
        quality.kid(images, images, feature="inception")


def test_load_clip_in_smoke_mode_is_the_tiny_one(monkeypatch):
    monkeypatch.setenv("HELPERS_TINY", "1")
    model, _ = quality.load_clip()
    assert model.config.projection_dim == 16
