"""helpers.oom: the out-of-memory ladder in generate() (OOM simulated by a pipeline call that raises it N times), its
rungs on a stand-in CUDA pipeline, and the training message."""
import types

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import diffusion, oom
from helpers.training.loop import TrainConfig


@pytest.fixture
def failing(sd, monkeypatch):
    """Make the pipeline's call raise torch.OutOfMemoryError for its first `n` calls (set failing.n); count calls and
    cache clearings; undo the VAE settings a rung turned on."""
    state = types.SimpleNamespace(n=0, calls=[], cleared=0)
    real_call = type(sd).__call__

    def call(self, *args, **kwargs):
        state.calls.append({k: kwargs.get(k) for k in ("num_images_per_prompt", "width", "height")})
        if len(state.calls) <= state.n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, *args, **kwargs)

    def clear():
        state.cleared += 1

    monkeypatch.setattr(type(sd), "__call__", call)
    monkeypatch.setattr(oom, "empty_cache", clear)
    yield state
    sd.vae.disable_slicing()
    sd.vae.disable_tiling()


def gen(pipe, **kwargs):
    kwargs = {"prompt": "a photo of a cat", "num_inference_steps": 2, "width": 64, "height": 64, "seed": 5,
              "progress": False, **kwargs}
    return diffusion.generate(pipe, **kwargs)


def arr(image):
    return np.asarray(image, dtype=np.int16)


def test_is_oom():
    assert oom.is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert oom.is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 17 GB)"))
    assert not oom.is_oom(RuntimeError("shape mismatch")) and not oom.is_oom(ValueError("out of memory"))


def test_a_batch_done_one_at_a_time_gives_the_same_images(sd, failing, capsys):
    expected = gen(sd, num_images_per_prompt=2)  # uninterrupted
    failing.calls.clear()
    failing.n = 1
    result = gen(sd, num_images_per_prompt=2)
    assert [c["num_images_per_prompt"] for c in failing.calls] == [2, 1, 1]
    assert result.seeds == expected.seeds == [5, 6]
    for got, want in zip(result.images, expected.images):
        assert np.abs(arr(got) - arr(want)).max() <= 1  # seed + i per image, as in the batch (float rounding: 1)
    assert "Out of GPU memory: trying again one image at a time" in capsys.readouterr().out
    assert failing.cleared == 1 and not sd.vae.use_slicing  # the first rung was enough


def test_then_vae_slicing_then_a_smaller_image_on_cpu(sd, failing, capsys):
    failing.n = 2  # batch of 1: no batch rung; CPU: no offload rung
    result = gen(sd)
    out = capsys.readouterr().out
    assert "with VAE slicing and tiling" in out and "offload" not in out
    assert "trying again at 48x48: the image will be SMALLER than the 64x64 asked for" in out
    assert sd.vae.use_slicing and sd.vae.use_tiling
    assert [(c["width"], c["height"]) for c in failing.calls] == [(64, 64), (64, 64), (48, 48)]
    assert result.images[0].size == (48, 48) and "Size: 48x48" in result.parameters[0]
    assert failing.cleared == 2


def test_a_clear_stop_lists_what_was_tried(sd, failing):
    failing.n = 100
    with pytest.raises(oom.OutOfMemoryStop) as caught:
        gen(sd, num_images_per_prompt=2)
    message = str(caught.value)
    assert "even after trying: one image at a time instead of 2; VAE slicing + tiling; 48x48 instead of 64x64" \
        in message
    assert "TROUBLESHOOTING.md#oom-generation" in message and isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert len(failing.calls) == 4  # the first try and one per rung


def test_other_errors_are_not_retried(sd, monkeypatch):
    calls = []

    def broken(self, *args, **kwargs):
        calls.append(1)
        raise KeyError("not memory")

    monkeypatch.setattr(type(sd), "__call__", broken)
    with pytest.raises(KeyError, match="not memory"):
        gen(sd)
    assert len(calls) == 1


class FakeVae:
    def __init__(self):
        self.slicing = self.tiling = False

    def enable_slicing(self):
        self.slicing = True

    def enable_tiling(self):
        self.tiling = True


def test_offload_is_a_rung_on_cuda(monkeypatch, capsys):
    monkeypatch.setattr(oom, "empty_cache", lambda: None)
    offloaded = []
    pipe = types.SimpleNamespace(device=torch.device("cuda"), vae=FakeVae(),
                                 enable_model_cpu_offload=lambda: offloaded.append(True))
    call = {"width": 1024, "height": 768}
    ladder = oom.Ladder(pipe, call, per_batch=4, size=(1024, 768))
    error = torch.OutOfMemoryError("CUDA out of memory")
    for _ in range(4):
        ladder.step_down(error)
    assert ladder.per_batch == 1 and pipe.vae.slicing and pipe.vae.tiling and offloaded == [True]
    assert call == {"width": 768, "height": 576} and ladder.size == (768, 576)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Out of GPU memory:")]
    assert len(lines) == 4 and "model CPU offload" in lines[2]
    with pytest.raises(RuntimeError, match="model CPU offload; 768x576 instead of 1024x768"):
        ladder.step_down(error)


def test_img2img_lowers_the_size_of_its_image(monkeypatch):
    monkeypatch.setattr(oom, "empty_cache", lambda: None)
    call = {"image": Image.new("RGB", (512, 512)), "strength": 0.5}
    ladder = oom.Ladder(types.SimpleNamespace(device="cpu"), call, per_batch=1, size=(512, 512))
    ladder.step_down(torch.OutOfMemoryError("out of memory"))
    assert call["image"].size == (384, 384) and "width" not in call


def test_training_oom_error_says_what_to_lower_and_turn_on(tmp_path):
    (tmp_path / "checkpoint-20").mkdir()
    (tmp_path / "checkpoint-100").mkdir()
    config = TrainConfig(dataset=str(tmp_path), run_dir=str(tmp_path), batch_size=4, resolution=768, rank=32,
                         gradient_checkpointing=False, optimizer="adamw")
    error = oom.training_oom_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.2 GiB"), config)
    message = str(error)
    assert isinstance(error, oom.OutOfMemoryStop) and isinstance(error, RuntimeError)
    assert "Tried to allocate 1.2 GiB" in message
    for text in ("batch_size 4 -> 1 (with gradient_accumulation_steps 4", "resolution 768 -> 512", "rank 32 -> 16",
                 "gradient_checkpointing=True", "optimizer='adamw8bit'", "cache_latents=True",
                 f"The last checkpoint, {tmp_path / 'checkpoint-100'}, is kept", "TROUBLESHOOTING.md#oom-training"):
        assert text in message, text


def test_training_oom_error_with_the_smallest_settings(tmp_path):
    config = TrainConfig(dataset=str(tmp_path), run_dir=str(tmp_path), batch_size=1, resolution=256, rank=4,
                         gradient_checkpointing=True, optimizer="adamw8bit", cache_latents=True)
    message = str(oom.training_oom_error(torch.OutOfMemoryError("CUDA out of memory"), config))
    assert "Lower:" not in message and "Turn on:" not in message and "already the smallest" in message
    assert "No checkpoint was written yet" in message


class FlakyImg2Img:
    """The hires pass's img2img pipeline, whose first call runs out of memory."""

    def __init__(self, pipe):
        self.pipe, self.vae, self.device, self.sizes = pipe, pipe.vae, pipe.device, []

    def set_progress_bar_config(self, **kwargs):
        self.pipe.set_progress_bar_config(**kwargs)

    def __getattr__(self, name):   # vae_scale_factor and the rest: the real pipeline's
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        self.sizes.append(kwargs["image"].size)
        if len(self.sizes) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return self.pipe(**kwargs)


def test_the_hires_pass_climbs_the_ladder_too(sd, failing, monkeypatch, capsys):
    # the image upscaler: the hires pass's img2img gets an image whose size the stub records
    whole = gen(sd, width=48, height=64, hires_scale=1.5, hires_strength=0.5, hires_upscaler="Lanczos")
    real_task_pipeline = diffusion.task_pipeline
    flaky = []

    def task_pipeline(pipe, task):   # txt2img as it is; the hires pass's img2img made flaky
        if task != "img2img":
            return real_task_pipeline(pipe, task)
        flaky.append(FlakyImg2Img(real_task_pipeline(pipe, task)))
        return flaky[-1]

    monkeypatch.setattr(diffusion, "task_pipeline", task_pipeline)
    again = gen(sd, width=48, height=64, hires_scale=1.5, hires_strength=0.5, hires_upscaler="Lanczos")
    assert flaky[0].sizes == [(72, 96), (72, 96)]   # the same size again, now with VAE slicing and tiling
    assert "Out of GPU memory: trying again with VAE slicing and tiling" in capsys.readouterr().out
    assert again.images[0].size == (72, 96)
    # the same seed, so the same picture; the tiny VAE's tiles are smaller than this image, so tiled decoding moves
    # some pixels near the seams: 4.0 on average here, where the next seed differs by 42
    assert np.abs(arr(whole.images[0]) - arr(again.images[0])).mean() < 8
