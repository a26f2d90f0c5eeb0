"""Each tiny family builds, reloads through the real from_pretrained path, and generates; builds are reproducible."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import tiny

SD_KEYS = ["sd15", "sd15-inpaint", "sd2", "sd2-inpaint", "sdxl", "sdxl-inpaint", "sd3", "sd3-64", "flux", "flux-64", "flux-dev",
           "flux-dev-64"]
LLAVA_KEYS = ["llava-next-mistral", "llava-next-vicuna", "llava-next-chatml"]


def _weights(folder: Path) -> dict:
    tensors = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            tensors[f"{f.relative_to(folder)}:{k}"] = v
    return tensors


def test_every_key_is_covered():
    assert set(tiny.BUILDERS) == set(SD_KEYS + LLAVA_KEYS)


@pytest.mark.parametrize("key", SD_KEYS)
def test_sd_family_builds_reloads_and_generates(key, tmp_path):
    from diffusers import AutoPipelineForInpainting, AutoPipelineForText2Image

    folder = tiny.build(key, tmp_path / key)
    assert (folder / "model_index.json").is_file() and (folder / "vae" / "config.json").is_file()
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
    kwargs = dict(prompt="a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    if key.endswith("inpaint"):
        pipe = AutoPipelineForInpainting.from_pretrained(folder)
        image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        kwargs.update(image=image, mask_image=mask, strength=1.0)
        assert pipe.unet.config.in_channels == 9
    else:
        pipe = AutoPipelineForText2Image.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**kwargs).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


@pytest.mark.parametrize("key", LLAVA_KEYS)
def test_llava_builds_reloads_and_generates(key, tmp_path):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    folder = tiny.build(key, tmp_path / key)
    model = LlavaNextForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    image = Image.fromarray((np.random.RandomState(0).rand(48, 64, 3) * 255).astype("uint8"))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) > 16  # base + any-resolution tiles
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("key, marker", [("llava-next-mistral", "[INST]"), ("llava-next-vicuna", "USER:"),
                                         ("llava-next-chatml", "<|im_start|>user")])
def test_llava_chat_formats(key, marker):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny.ensure(key))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True)
    assert marker in prompt and "<image>" in prompt


@pytest.mark.parametrize("key", ["sd15", "sdxl", "flux", "llava-next-mistral"])
def test_two_builds_give_equal_weights_and_another_seed_differs(key, tmp_path):
    a = _weights(tiny.build(key, tmp_path / "a", seed=0))
    b = _weights(tiny.build(key, tmp_path / "b", seed=0))
    c = _weights(tiny.build(key, tmp_path / "c", seed=1))
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_clip_tokenizer_keeps_each_word_whole():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny.ensure("sd15") / "tokenizer")
    for word in set(tiny.CLIP_WORDS):
        assert tok.tokenize(word) == [word + "</w>"], word
    assert tok.model_max_length == 77


def test_ensure_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HELPERS_CACHE", str(tmp_path))
    first = tiny.ensure("sd15")
    stamp = (first / "model_index.json").stat().st_mtime_ns
    assert tiny.ensure("sd15") == first and (first / "model_index.json").stat().st_mtime_ns == stamp


def test_a_failed_build_leaves_no_folder_behind(tmp_path, monkeypatch):
    def broken(folder, tmp):
        folder.mkdir(parents=True)
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-build")

    monkeypatch.setenv("HELPERS_CACHE", str(tmp_path))
    monkeypatch.setitem(tiny.BUILDERS, "sd15", broken)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        tiny.ensure("sd15")
    assert list((tmp_path / "tiny").iterdir()) == []


def test_unknown_key():
    with pytest.raises(ValueError, match="No tiny model 'sd4'; known: sd15"):
        tiny.ensure("sd4")
