"""SDXL LoRA training on the tiny SDXL: two text encoders, size/crop time ids, exports that load and paint alike."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import loading
from helpers.training import datasets, export, loop, losses
from conftest import draw_dataset

FP16_ATOL = 2e-3   # the kohya file is fp16 (see test_training_export.py)
COLOURED_CATS = [f"a photo of a cat, {colour}" for colour in ("red", "blue", "green")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return draw_dataset(tmp_path_factory.mktemp("data") / "2_sks cat", [(64, 64), (96, 64), (64, 80)], COLOURED_CATS)


def paint(pipe, folder=None, weight_name=None):
    if folder is not None:
        pipe.load_lora_weights(str(folder), weight_name=weight_name)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of sks cat", num_inference_steps=2, width=64, height=64, output_type="np",
                generator=torch.Generator().manual_seed(3)).images[0]


def test_time_ids_are_original_size_crop_and_bucket_per_example(dataset):
    data = datasets.TrainingDataset(datasets.find_items(dataset), 64, crop="center", seed=0)
    wide = [e.path.name for e in data.entries].index("1.png")
    batch = datasets.collate_examples([data[wide]])
    ids = losses.time_ids(batch, "cpu", torch.float32)
    # the 96x64 file, in the one 64x64 bucket: kept at 96x64, cut 16 px from the left; (h, w), (top, left), (h, w)
    assert ids.tolist() == [[64.0, 96.0, 0.0, 16.0, 64.0, 64.0]]


def test_encode_prompts_sdxl_concatenates_both_encoders_and_pools_the_second():
    pipe = loading.load_sd("sdxl", dtype=torch.float32)
    states, pooled = losses.encode_prompts(["a photo of a cat"], [pipe.text_encoder, pipe.text_encoder_2],
                                           [pipe.tokenizer, pipe.tokenizer_2], "cpu")
    # what the pipeline itself conditions on (its encode_prompt: penultimate layers, pooled of encoder 2)
    expected, _, expected_pooled, _ = pipe.encode_prompt("a photo of a cat", device="cpu",
                                                         do_classifier_free_guidance=False)
    torch.testing.assert_close(states, expected)
    torch.testing.assert_close(pooled, expected_pooled)


def test_sdxl_lora_trains_exports_and_loads(dataset, tmp_path):
    config = loop.TrainConfig(dataset=str(dataset), run_dir=str(tmp_path / "run"), base_model="sdxl", resolution=64,
                              rank=4, alpha=8, learning_rate=1e-2, max_train_steps=3, checkpoint_every=3, seed=0,
                              trigger="sks", train_text_encoder=True, sample_every=3,
                              sample_prompts=["a photo of sks cat"], sample_steps=2)
    result = loop.train_lora(config, progress=False)
    assert result.family == "sdxl" and result.steps == 3 and all(np.isfinite(result.losses))
    assert sorted(p.name for p in (tmp_path / "run" / "samples" / "step-000003").glob("*.png")) == ["00000-1234.png"]
    weights = load_file(result.lora_path)
    assert {k.split(".")[0] for k in weights} == {"unet", "text_encoder", "text_encoder_2"}
    kohya = tmp_path / "run" / "lora" / "sks.safetensors"
    tensors = load_file(kohya)
    assert {k.split("_text_model_")[0] for k in tensors if "_text_model_" in k} == {"lora_te1", "lora_te2"}
    assert any(k.startswith("lora_unet_") for k in tensors)
    assert export.read_lora_metadata(kohya)["ss_base_model_version"] == "sdxl_base_v1-0"

    plain = paint(loading.load_sd("sdxl", dtype=torch.float32))
    from_diffusers = paint(loading.load_sd("sdxl", dtype=torch.float32), result.lora_path.parent,
                           result.lora_path.name)
    from_kohya = paint(loading.load_sd("sdxl", dtype=torch.float32), kohya.parent, kohya.name)
    assert np.abs(from_diffusers - plain).max() > 1e-2          # the trained LoRA changes the image
    np.testing.assert_allclose(from_kohya, from_diffusers, atol=FP16_ATOL)


def test_an_sdxl_run_killed_and_resumed_ends_with_the_same_weights(dataset, tmp_path):
    def run(folder, stop_after=None):
        config = loop.TrainConfig(dataset=str(dataset), run_dir=str(folder), base_model="sdxl", resolution=64, rank=4,
                                  alpha=4, learning_rate=1e-2, max_train_steps=4, checkpoint_every=2, seed=0,
                                  trigger="sks", train_text_encoder=True, flip_p=0.5)
        return loop.train_lora(config, stop_after=stop_after, progress=False)

    whole = run(tmp_path / "whole")
    run(tmp_path / "cut", stop_after=3)
    resumed = run(tmp_path / "cut")
    assert resumed.resumed_from == 2
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
