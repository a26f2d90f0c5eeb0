"""The LoRA training loop on the tiny SD 1.5: checkpoints, a resume that ends where an uninterrupted run ends, NaN."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers.training import loop
from conftest import draw_dataset


COLOURED_CATS = [f"a photo of a cat, {colour}" for colour in ("red", "blue", "green")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return draw_dataset(tmp_path_factory.mktemp("data") / "5_sks cat", [(64, 64)] * 3, COLOURED_CATS)


def config(dataset, run_dir, **kwargs):
    settings = dict(dataset=str(dataset), run_dir=str(run_dir), resolution=64, rank=4, alpha=4, learning_rate=1e-3,
                    max_train_steps=6, checkpoint_every=2, seed=0, trigger="sks", flip_p=0.5)
    return loop.TrainConfig(**{**settings, **kwargs})


def test_a_run_killed_and_resumed_ends_with_the_same_weights(dataset, tmp_path):
    whole = loop.train_lora(config(dataset, tmp_path / "whole"), progress=False)
    assert whole.steps == 6 and len(whole.losses) == 6 and whole.resumed_from is None
    cut = loop.train_lora(config(dataset, tmp_path / "cut"), stop_after=3, progress=False)
    assert cut.steps == 3 and [s for s, _ in loop.checkpoints(tmp_path / "cut")] == [2]  # step 3 is lost
    resumed = loop.train_lora(config(dataset, tmp_path / "cut"), progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 6
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and len(a) > 8
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the log too (read back from loss.csv, 6 decimals): the lost step 3 was trained again, identically
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-6)
    assert (tmp_path / "cut" / "loss.png").is_file()


def test_a_lora_checkpoint_holds_the_adapter_and_optimizer_never_the_frozen_base(dataset, tmp_path, capsys):
    loop.train_lora(config(dataset, tmp_path, train_text_encoder=True), stop_after=2, progress=False)
    [(_, checkpoint)] = loop.checkpoints(tmp_path)
    files = sorted(p.name for p in checkpoint.iterdir())
    assert "adapter_0.safetensors" in files and "adapter_1.safetensors" in files   # the UNet's and the text encoder's
    assert not [f for f in files if f.startswith("model")]                         # no whole model
    for name in ("adapter_0.safetensors", "adapter_1.safetensors"):
        tensors = load_file(checkpoint / name)
        assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors), list(tensors)[:3]
    base = sum(p.stat().st_size for p in checkpoint.rglob("*"))
    assert "Each checkpoint: about " in capsys.readouterr().out
    from helpers import loading

    unet_bytes = sum(p.numel() * 4 for p in loading.load_sd("sd15").unet.parameters())
    assert base < unet_bytes / 4   # the tiny UNet alone is larger than the whole checkpoint


def test_a_checkpoint_of_whole_models_from_an_earlier_version_still_resumes_exactly(dataset, tmp_path, monkeypatch):
    whole = loop.train_lora(config(dataset, tmp_path / "whole"), progress=False)
    with monkeypatch.context() as m:   # the earlier behaviour: accelerate saves every prepared model whole
        m.setattr(loop, "save_trained_only", lambda accelerator: None)
        loop.train_lora(config(dataset, tmp_path / "old"), stop_after=3, progress=False)
    [(_, old)] = loop.checkpoints(tmp_path / "old")
    assert (old / "model.safetensors").is_file() and not (old / "adapter_0.safetensors").exists()
    resumed = loop.train_lora(config(dataset, tmp_path / "old"), progress=False)
    assert resumed.resumed_from == 2
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_only_the_last_checkpoints_are_kept_and_half_saves_never_count(dataset, tmp_path):
    loop.train_lora(config(dataset, tmp_path, keep_checkpoints=2), progress=False)
    assert [s for s, _ in loop.checkpoints(tmp_path)] == [4, 6]
    (tmp_path / ".checkpoint-8.tmp").mkdir()  # what a kill during a save leaves
    (tmp_path / "checkpoint-x").mkdir()
    assert [s for s, _ in loop.checkpoints(tmp_path)] == [4, 6]


def test_a_nan_loss_stops_and_names_the_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    real = loop._loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(loop, "_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"The loss became nan at step 4 .*lower `learning_rate`.*"
                                                 r"checkpoint-2, the last good checkpoint"):
        loop.train_lora(config(dataset, tmp_path), progress=False)
    assert [s for s, _ in loop.checkpoints(tmp_path)] == [2]


def test_a_blown_up_run_resumes_from_its_last_good_checkpoint_with_a_lower_learning_rate(dataset, tmp_path):
    """A learning rate of 1e30 from step 3 on: the checkpoint that holds the blown-up weights is set aside (never
    resumed from, never deleted), and the run started again with the old rate ends as if nothing had happened."""
    whole = loop.train_lora(config(dataset, tmp_path / "whole", max_train_steps=5, checkpoint_every=1),
                            progress=False)
    run = tmp_path / "run"
    loop.train_lora(config(dataset, run, max_train_steps=5, checkpoint_every=1), stop_after=2, progress=False)
    blown = config(dataset, run, max_train_steps=5, checkpoint_every=1)
    blown.learning_rate = 1e30   # past TrainConfig's own check, as an edited config.json would be
    with pytest.raises(FloatingPointError, match=r"(loss became nan|weights became NaN).*resumes from .*checkpoint-2"):
        loop.train_lora(blown, progress=False)
    assert [s for s, _ in loop.checkpoints(run)] == [1, 2]   # none past the blow-up
    assert all(torch.isfinite(t).all() for p in run.glob("checkpoint-*") for f in p.glob("*.safetensors")
               for t in load_file(f).values())
    resumed = loop.train_lora(config(dataset, run, max_train_steps=5, checkpoint_every=1), progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 5
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_lower_learning_rate_applies_on_resume(dataset, tmp_path, capsys):
    loop.train_lora(config(dataset, tmp_path, max_train_steps=4, lr_scheduler="linear"), stop_after=2,
                    progress=False)
    import torch.optim.lr_scheduler as schedulers

    seen = []   # the learning rate of each scheduler step, read before the step

    original_step = schedulers.LRScheduler.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.optimizer.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(schedulers.LRScheduler, "step", recording_step)
        loop.train_lora(config(dataset, tmp_path, max_train_steps=4, lr_scheduler="linear", learning_rate=1e-4),
                        progress=False)
    assert "The learning rate changed since the checkpoint (0.001 -> 0.0001)" in capsys.readouterr().out
    # linear decay over 4 steps: step 3 runs at half the base rate, step 4 at a quarter: of the NEW base rate
    assert seen[-2:] == pytest.approx([0.5e-4, 0.25e-4])


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "`rank` must be a positive integer, not 0"),
    ({"learning_rate": 5}, "`learning_rate` must be between 0 and 1"),
    ({"resolution": 500}, "`resolution` must be a multiple of 64, not 500: use 512"),
    ({"targets": "all"}, "`targets` must be one of attention, attention\\+ff"),
])
def test_bad_configs(dataset, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(dataset, tmp_path, **kwargs)


def test_samples_and_the_kohya_export(dataset, tmp_path):
    from helpers.training import export

    result = loop.train_lora(config(dataset, tmp_path / "a", max_train_steps=4, sample_every=2,
                                    sample_prompts=["a photo of sks cat", "sks cat, watercolor"], sample_steps=2),
                             progress=False)
    samples = sorted(p.relative_to(tmp_path / "a" / "samples").as_posix()
                     for p in (tmp_path / "a" / "samples").rglob("*.png"))
    assert samples == ["step-000002/00000-1234.png", "step-000002/00001-1235.png",
                       "step-000004/00000-1234.png", "step-000004/00001-1235.png"]
    kohya = tmp_path / "a" / "lora" / "sks.safetensors"
    metadata = export.read_lora_metadata(kohya)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_steps"] == "4" and result.lora_path.is_file()


@pytest.mark.parametrize("kwargs, message", [
    ({"mixed_precision": "fp16"}, "mixed_precision='fp16' needs a CUDA GPU"),
    ({"optimizer": "adamw8bit"}, "optimizer='adamw8bit' needs a CUDA GPU"),
])
def test_gpu_only_choices_are_refused_on_cpu(dataset, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        loop.train_lora(config(dataset, tmp_path, **kwargs), progress=False)


def test_dreambooth_prior_preservation_caches_class_images_and_resumes_exactly(dataset, tmp_path):
    settings = dict(instance_prompt="a photo of sks cat", class_prompt="a photo of a cat", num_class_images=2,
                    prior_loss_weight=0.5, max_train_steps=4)
    whole = loop.train_lora(config(dataset, tmp_path / "whole", **settings), progress=False)
    class_images = sorted((tmp_path / "whole" / "class_images").glob("*.png"))
    assert len(class_images) == 2  # SMOKE MODE caps the count at 2
    loop.train_lora(config(dataset, tmp_path / "cut", **settings), stop_after=3, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cut" / "class_images").glob("*.png")}
    resumed = loop.train_lora(config(dataset, tmp_path / "cut", **settings), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cut" / "class_images").glob("*.png")} == stamps
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = loop.train_lora(config(dataset, tmp_path / "plain", max_train_steps=4), progress=False)
    assert plain.losses != pytest.approx(whole.losses)  # the prior term is in the loss


def test_text_encoder_lora_is_trained_exported_and_resumes_exactly(dataset, tmp_path):
    from helpers import diffusion, loading

    settings = dict(train_text_encoder=True, text_encoder_lr=5e-4, max_train_steps=4)
    whole = loop.train_lora(config(dataset, tmp_path / "whole", **settings), progress=False)
    weights = load_file(whole.lora_path)
    assert any(k.startswith("text_encoder.") for k in weights) and any(k.startswith("unet.") for k in weights)
    loop.train_lora(config(dataset, tmp_path / "cut", **settings), stop_after=3, progress=False)
    resumed = loop.train_lora(config(dataset, tmp_path / "cut", **settings), progress=False)
    again = load_file(resumed.lora_path)
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    pipe = loading.load_sd("sd15")
    ids = pipe.tokenizer("a photo of sks cat", return_tensors="pt").input_ids
    before = pipe.text_encoder(ids)[0]
    pipe.load_lora_weights(str(whole.lora_path.parent), weight_name=whole.lora_path.name)
    assert not torch.allclose(before, pipe.text_encoder(ids)[0])  # the text encoder LoRA loads and acts
    assert diffusion.generate(pipe, "a photo of sks cat", num_inference_steps=2, seed=1, progress=False).images


def test_loss_falls_when_overfitting_one_image(tmp_path):
    """Measured on fixed noise and timesteps (the training loss itself jumps with the random timestep)."""
    from helpers import loading
    from helpers.training import datasets

    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray((np.random.RandomState(7).rand(64, 64, 3) * 255).astype("uint8")).save(folder / "a.png")
    (folder / "a.txt").write_text("a photo of sks")
    result = loop.train_lora(config(folder, tmp_path / "run", max_train_steps=10, learning_rate=2e-2, flip_p=0.0,
                                    checkpoint_every=10), progress=False)
    batch = datasets.collate_examples([datasets.TrainingDataset(datasets.find_items(folder), 64)[0]])
    pipe = loading.load_sd("sd15")
    settings = config(folder, tmp_path)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def fixed_loss():
        torch.manual_seed(0)
        with torch.no_grad():
            return sum(loop._loss(batch, pipe.unet, pipe.vae, [pipe.text_encoder], [pipe.tokenizer], scheduler,
                                  settings, "cpu").item() for _ in range(8)) / 8

    before = fixed_loss()
    pipe.load_lora_weights(str(result.lora_path.parent), weight_name=result.lora_path.name)
    after = fixed_loss()
    assert after < before - 0.005, (before, after)  # untrained (or broken) LoRA weights leave it equal


def _flaky_save_state(monkeypatch, failures):
    """Accelerator.save_state that raises OSError while `failures(folder)` says so."""
    from accelerate import Accelerator

    real = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        if failures(output_dir):
            raise OSError(5, "Input/output error", output_dir)
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    from helpers.training import checkpoints

    monkeypatch.setattr(checkpoints, "RETRY_DELAYS_S", (0, 0))


def test_a_failed_checkpoint_write_is_tried_again(dataset, tmp_path, monkeypatch, capsys):
    tries = []
    _flaky_save_state(monkeypatch, lambda folder: tries.append(folder) or len(tries) == 1)  # the first try fails
    loop.train_lora(config(dataset, tmp_path, max_train_steps=2), progress=False)
    assert [s for s, _ in loop.checkpoints(tmp_path)] == [2] and (tmp_path / "checkpoint-2").is_dir()
    assert "Writing checkpoint 2 failed" in capsys.readouterr().out


def test_when_drive_stays_unwritable_the_checkpoint_goes_to_local_disk_and_resumes(dataset, tmp_path, monkeypatch,
                                                                                   capsys):
    from helpers import storage

    monkeypatch.setattr(storage, "LOCAL_FALLBACK", tmp_path / "local")
    run_dir = tmp_path / "drive" / "run"
    drive_back = []
    _flaky_save_state(monkeypatch, lambda folder: not drive_back and str(run_dir) in str(folder))
    loop.train_lora(config(dataset, run_dir, max_train_steps=4), stop_after=2, progress=False)
    assert "Saved it to" in capsys.readouterr().out
    from helpers.training import checkpoints

    assert [(s, p.parent) for s, p in loop.checkpoints(run_dir)] == [(2, checkpoints.fallback_dir(run_dir))]
    drive_back.append(True)
    resumed = loop.train_lora(config(dataset, run_dir, max_train_steps=4), progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 4 and (run_dir / "checkpoint-4").is_dir()


def test_cached_latents_encode_each_image_once_and_resume_exactly(dataset, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    encodes = []
    real = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode",
                        lambda self, x, *a, **k: encodes.append(len(x)) or real(self, x, *a, **k))
    settings = dict(cache_latents=True, flip_p=0.0, max_train_steps=4)
    whole = loop.train_lora(config(dataset, tmp_path / "whole", **settings), progress=False)
    assert encodes == [1, 1, 1]  # three images (repeated 5 times each), each encoded once, none per step
    loop.train_lora(config(dataset, tmp_path / "cut", **settings), stop_after=3, progress=False)
    resumed = loop.train_lora(config(dataset, tmp_path / "cut", **settings), progress=False)
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="`cache_latents` encodes each image once, so it cannot be flipped"):
        config(dataset, tmp_path, cache_latents=True, flip_p=0.5)


def test_dora_trains_and_its_diffusers_file_loads_while_kohya_is_skipped(dataset, tmp_path, capsys):
    from helpers import diffusion, loading
    from helpers.training import export

    result = loop.train_lora(config(dataset, tmp_path, use_dora=True, train_text_encoder=True, max_train_steps=3,
                                    learning_rate=1e-2), progress=False)
    weights = load_file(result.lora_path)
    magnitudes = [k for k in weights if "lora_magnitude_vector" in k]
    assert any(k.startswith("unet.") for k in magnitudes) and any(k.startswith("text_encoder.") for k in magnitudes)
    assert sorted(p.name for p in result.lora_path.parent.iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert "no kohya/A1111 file" in capsys.readouterr().out
    metadata = export.read_lora_metadata(result.lora_path)
    adapter = json.loads(metadata["lora_adapter_metadata"])
    assert adapter["unet.use_dora"] is True and adapter["text_encoder.use_dora"] is True
    pipe = loading.load_sd("sd15")
    plain = diffusion.generate(pipe, "a photo of sks cat", num_inference_steps=2, seed=1, progress=False).images[0]
    pipe.load_lora_weights(str(result.lora_path.parent), weight_name=result.lora_path.name)
    assert any("lora_magnitude_vector" in n for n, _ in pipe.unet.named_parameters())   # loaded as a DoRA
    tuned = diffusion.generate(pipe, "a photo of sks cat", num_inference_steps=2, seed=1, progress=False).images[0]
    assert np.abs(np.asarray(tuned, dtype=float) - np.asarray(plain, dtype=float)).max() > 0


def test_a_resume_with_settings_that_change_the_weights_is_refused_before_loading(dataset, tmp_path, monkeypatch):
    from helpers import loading

    loop.train_lora(config(dataset, tmp_path, max_train_steps=4), stop_after=2, progress=False)
    loads = []
    monkeypatch.setattr(loading, "load_sd", lambda *a, **k: loads.append(a))
    with pytest.raises(ValueError, match=r"was trained with use_dora=False \(now True\), rank=4 \(now 8\), so "
                                         r"it cannot resume .*use a new run folder"):
        loop.train_lora(config(dataset, tmp_path, max_train_steps=4, rank=8, use_dora=True), progress=False)
    assert loads == []


def test_the_learning_rate_schedule_counts_optimizer_steps_with_gradient_accumulation(dataset, tmp_path, monkeypatch):
    import diffusers.optimization

    made = []
    real = diffusers.optimization.get_scheduler
    monkeypatch.setattr(diffusers.optimization, "get_scheduler", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    result = loop.train_lora(config(dataset, tmp_path, lr_scheduler="linear", gradient_accumulation_steps=2,
                                    max_train_steps=4, checkpoint_every=4), progress=False)
    assert result.steps == 4
    assert made[0].get_last_lr()[0] == 0.0   # linear decay ends at the last optimizer step, not half-way


def test_out_of_memory_while_training_stops_with_what_to_change(dataset, tmp_path, monkeypatch):
    from helpers import oom

    real = loop._loss
    calls = []

    def runs_out(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_loss", runs_out)
    with pytest.raises(oom.OutOfMemoryStop, match=r"Out of GPU memory while training.*gradient_accumulation|"
                                                  r"Out of GPU memory while training.*Turn on") as caught:
        loop.train_lora(config(dataset, tmp_path, gradient_checkpointing=False), progress=False)
    assert f"The last checkpoint, {tmp_path / 'checkpoint-2'}, is kept" in str(caught.value)
    assert "gradient_checkpointing=True" in str(caught.value)
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)


def test_frozen_text_encoders_encode_each_caption_once(dataset, tmp_path, monkeypatch):
    """diffusers' --pre_compute_text_embeddings, lazily: three captions, six steps, three encodings."""
    from helpers.training import losses

    encoded, real = [], losses.encode_prompts

    def counting(captions, *args):
        encoded.extend(captions)
        return real(captions, *args)

    monkeypatch.setattr(losses, "encode_prompts", counting)
    loop.train_lora(config(dataset, tmp_path / "frozen", flip_p=0.0), progress=False)
    assert sorted(encoded) == sorted(set(encoded)) and len(encoded) == 3
    encoded.clear()
    loop.train_lora(config(dataset, tmp_path / "trained", train_text_encoder=True, max_train_steps=2), progress=False)
    assert len(encoded) == 2   # a trained text encoder encodes every batch again (batch 1, two steps)
