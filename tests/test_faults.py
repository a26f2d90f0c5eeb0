"""The fault suite: each fault a Colab run meets, injected on CPU with the tiny models, and what the helpers do.

Drive writes that fail, a kill in the middle of a file or checkpoint write, out of memory, NaN loss and NaN images,
damaged safetensors files, pickle checkpoints, a gated model without a token.
"""
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import captions, diffusion, images, loading, lora, registry, storage, tiny
from helpers.training import loop
from conftest import draw_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return draw_dataset(tmp_path_factory.mktemp("data") / "5_sks cat", [(64, 64)] * 2, ["a photo of a cat"] * 2)


def train_config(dataset, run_dir, **kwargs):
    settings = dict(dataset=str(dataset), run_dir=str(run_dir), resolution=64, rank=4, alpha=4, learning_rate=1e-3,
                    max_train_steps=4, checkpoint_every=2, seed=0)
    return loop.TrainConfig(**{**settings, **kwargs})


# --- a Drive write that fails ----------------------------------------------------------------------------------------

@pytest.fixture
def drive(tmp_path, monkeypatch):
    """A 'Drive' folder whose writes fail with ENOTCONN (what a dropped Drive mount raises) while drive.down says so
    (drive.down = n: the next n writes fail; True: every write fails). Retries do not wait; the fallback is in tmp."""
    folder = tmp_path / "drive"
    folder.mkdir()
    real_mkstemp = tempfile.mkstemp
    state = type("Drive", (), {"path": folder, "down": 0, "failed": 0})()

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and str(dir).startswith(str(folder)) and state.down:
            state.failed += 1
            if state.down is not True:
                state.down -= 1
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(storage, "WRITE_RETRY_DELAYS_S", (0, 0))
    monkeypatch.setattr(storage, "LOCAL_FALLBACK", tmp_path / "local")
    monkeypatch.setenv(storage.ENV_HOME, str(folder))
    return state


def test_a_failed_write_is_tried_again(drive, capsys):
    drive.down = 1
    path = storage.atomic_write(drive.path / "outputs" / "a.txt", "hello")
    assert path == drive.path / "outputs" / "a.txt" and path.read_text() == "hello" and drive.failed == 1
    assert f"Writing {path} failed ([Errno {errno.ENOTCONN}] Transport endpoint is not connected" in \
        capsys.readouterr().out


def test_when_drive_stays_down_the_file_goes_to_local_disk_and_says_where(drive, capsys):
    drive.down = True
    path = storage.atomic_write(drive.path / "outputs" / "captions" / "a.txt", "a cat")
    assert path == storage.LOCAL_FALLBACK / "outputs" / "captions" / "a.txt" and path.read_text() == "a cat"
    assert drive.failed == 3  # the first try and two retries
    out = capsys.readouterr().out
    assert f"Saved it to {path}" in out and "lost when the session ends" in out
    assert not (drive.path / "outputs" / "captions" / "a.txt").exists()


def test_a_generated_image_is_saved_locally_when_drive_is_down(sd, drive, capsys):
    result = diffusion.generate(sd, "a photo of a cat", num_inference_steps=2, width=64, height=64, seed=3,
                                progress=False)
    drive.down = True
    (path,) = result.save(drive.path / "outputs" / "txt2img")
    assert path.is_relative_to(storage.LOCAL_FALLBACK) and path.name == "00000-3.png"
    assert images.read_parameters(path)["Seed"] == "3"  # a whole PNG, parameters included
    assert str(path) in capsys.readouterr().out


def test_images_that_fall_back_never_overwrite_each_other(drive):
    drive.down = True
    folder = drive.path / "outputs" / "txt2img"
    first = images.save_image(Image.new("RGB", (8, 8), (255, 0, 0)), folder, "a red square", label="7")
    second = images.save_image(Image.new("RGB", (8, 8), (0, 0, 255)), folder, "a blue square", label="7")  # same seed
    assert [first.name, second.name] == ["00000-7.png", "00001-7.png"] and first.parent == second.parent
    assert images.read_parameters(first)["prompt"] == "a red square"
    drive.down = 0  # Drive is back: its numbering goes on after the fallen-back files, so they can be copied over
    assert images.save_image(Image.new("RGB", (8, 8)), folder, label="8") == folder / "00002-8.png"


def test_a_folder_that_cannot_be_listed_numbers_the_image_in_the_fallback(drive, monkeypatch, capsys):
    real = storage.next_free_path

    def next_free_path(folder, *args):
        if str(folder).startswith(str(drive.path)):  # listing the folder on a dropped mount
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected", str(folder))
        return real(folder, *args)

    monkeypatch.setattr(storage, "next_free_path", next_free_path)
    path = images.save_image(Image.new("RGB", (8, 8)), drive.path / "outputs", "a cat", label="1")
    assert path == storage.LOCAL_FALLBACK / "outputs" / "00000-1.png" and path.is_file()
    assert "Cannot use" in capsys.readouterr().out


def test_a_caption_is_saved_locally_when_drive_is_down(drive):
    image = drive.path / "datasets" / "cat.png"
    image.parent.mkdir()
    Image.new("RGB", (8, 8)).save(image)
    drive.down = True
    path = captions.save_caption(image, "a  cat ")
    assert path == storage.LOCAL_FALLBACK / "datasets" / "cat.txt" and path.read_text() == "a cat\n"


# --- a kill in the middle of a write ---------------------------------------------------------------------------------

def _run_until(script: str, marker: str, *args) -> None:
    """Run `script` in a new Python, wait until it prints `marker`, then SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        for line in proc.stdout:
            if line.strip() == marker:
                break
        else:
            pytest.fail(f"the child ended (rc {proc.wait()}) before printing {marker}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_a_kill_during_a_file_write_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "transcript.json"
    storage.atomic_write(target, '{"turns": 1}')
    _run_until("""
        import sys, time
        from helpers import storage
        with storage.atomic_open(sys.argv[1], "w") as f:
            f.write('{"turns": 2, "half of it')
            f.flush()
            print("HALF", flush=True)
            time.sleep(600)
    """, "HALF", target)
    assert target.read_text() == '{"turns": 1}'  # the previous file, whole
    assert storage.atomic_write(target, '{"turns": 2}').read_text() == '{"turns": 2}'  # and the next write works


def test_a_kill_during_a_checkpoint_save_keeps_the_previous_checkpoint_and_resumes(dataset, tmp_path):
    run_dir = tmp_path / "run"
    # the child trains; its second checkpoint (step 4) is written, one of its files cut in half, and the process
    # killed before the checkpoint is complete
    _run_until("""
        import sys, time
        from pathlib import Path
        from accelerate import Accelerator
        from helpers.training import loop

        real = Accelerator.save_state
        saves = []

        def save_state(self, output_dir=None, **kwargs):
            saves.append(output_dir)
            out = real(self, output_dir, **kwargs)
            if len(saves) == 2:
                biggest = max((p for p in Path(output_dir).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
                biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
                print("MID-SAVE", flush=True)
                time.sleep(600)
            return out

        Accelerator.save_state = save_state
        config = loop.TrainConfig(dataset=sys.argv[1], run_dir=sys.argv[2], resolution=64, rank=4, alpha=4,
                                  learning_rate=1e-3, max_train_steps=4, checkpoint_every=2, seed=0)
        loop.train_lora(config, progress=False)
    """, "MID-SAVE", dataset, run_dir)
    assert [(s, p.name) for s, p in loop.checkpoints(run_dir)] == [(2, "checkpoint-2")]  # the half save never counts
    resumed = loop.train_lora(train_config(dataset, run_dir), progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 4 and resumed.lora_path.is_file()
    assert [s for s, _ in loop.checkpoints(run_dir)] == [2, 4]
    # that the resumed run ends with the uninterrupted run's weights: tests/test_training_loop.py


# --- out of memory ---------------------------------------------------------------------------------------------------

def test_out_of_memory_in_generation_steps_down_the_ladder(sd, monkeypatch, capsys):
    from helpers import oom

    real, calls = type(sd).__call__, []

    def call(self, *args, **kwargs):
        calls.append(kwargs["num_images_per_prompt"])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(sd), "__call__", call)
    monkeypatch.setattr(oom, "empty_cache", lambda: None)
    result = diffusion.generate(sd, "a cat", num_inference_steps=2, width=64, height=64, seed=1,
                                num_images_per_prompt=2, progress=False)
    assert calls == [2, 1, 1] and result.seeds == [1, 2] and len(result.images) == 2
    assert "Out of GPU memory: trying again one image at a time" in capsys.readouterr().out
    # the other rungs, the clear stop and the training message: tests/test_oom.py


# --- NaN -------------------------------------------------------------------------------------------------------------

def test_a_huge_learning_rate_stops_training_with_the_fix(dataset, tmp_path):
    config = train_config(dataset, tmp_path, max_train_steps=3, checkpoint_every=1)
    config.learning_rate = 1e30  # past TrainConfig's own check (< 1), as a typo in a notebook would be
    with pytest.raises(FloatingPointError) as caught:
        loop.train_lora(config, progress=False)
    message = str(caught.value)
    assert "The loss became" in message and "lower `learning_rate`" in message


def test_nan_images_are_caught_with_the_cause_and_fix():
    pipe = loading.load_sd("sd15")  # its own copy: its VAE is poisoned below
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.fill_(float("nan"))  # an fp16 overflow in the VAE, as on a T4
    with pytest.raises(FloatingPointError, match=r"came out NaN or black.*VAE in float32.*TROUBLESHOOTING.md#nan-imag"):
        diffusion.generate(pipe, "a cat", num_inference_steps=2, width=64, height=64, seed=1, progress=False)


# --- damaged safetensors ---------------------------------------------------------------------------------------------

def _copy_tiny(key, folder) -> Path:
    return Path(shutil.copytree(tiny.ensure(key), folder))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_weights_file_in_a_model_folder_is_named(tmp_path, damage):
    folder = _copy_tiny("sd15", tmp_path / "model")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    with pytest.raises(OSError) as caught:
        loading.load_sd(str(folder))
    message = str(caught.value)
    assert repr(str(weights)) in message and "damaged" in message
    assert "TROUBLESHOOTING.md#corrupt-safetensors" in message


def test_a_damaged_llava_weights_file_is_named(tmp_path):
    folder = _copy_tiny("llava-next-mistral", tmp_path / "llava")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OSError, match="damaged") as caught:
        loading.load_llava(str(folder))
    assert repr(str(weights)) in str(caught.value)


def _lora_file(folder: Path, safe: bool = True) -> Path:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny.ensure("sd15") / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    name = "style.safetensors" if safe else "style.bin"
    StableDiffusionPipeline.save_lora_weights(str(folder), convert_state_dict_to_diffusers(
        get_peft_model_state_dict(unet)), weight_name=name, safe_serialization=safe)
    return folder / name


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_lora_file_is_named(sd, tmp_path, damage):
    path = _lora_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"<html>Google Drive - virus scan</html>")
    with pytest.raises(ValueError, match="damaged, cut short or not a safetensors file") as caught:
        lora.load_lora(sd, str(path))
    assert repr(str(path)) in str(caught.value) and lora.active_loras(sd) == {}


# --- pickle checkpoints ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt"])
def test_a_pickle_lora_is_refused(sd, tmp_path, suffix):
    path = tmp_path / f"style{suffix}"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"is a pickle file .*allow_pickle=True.*TROUBLESHOOTING.md#pickle-refused"):
        lora.load_lora(sd, str(path))
    with pytest.raises(ValueError, match="is a pickle file"):
        lora.load_embedding(sd, str(path))


def test_a_pickle_lora_loads_when_explicitly_allowed_with_a_warning(tmp_path):
    pipe = loading.load_sd("sd15")
    path = _lora_file(tmp_path, safe=False)
    with pytest.warns(UserWarning, match="Loading the pickle file"):
        name = lora.load_lora(pipe, str(path), allow_pickle=True)
    assert lora.active_loras(pipe) == {name: 1.0}


def test_a_model_folder_with_only_pickle_weights_is_refused(tmp_path):
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(tiny.ensure("sd15")).save_pretrained(tmp_path / "pickled",
                                                                                   safe_serialization=False)
    # (transformers 5 writes safetensors whatever it is told: the text encoder's weights stay safe)
    assert [p.name for p in (tmp_path / "pickled" / "unet").iterdir() if "model" in p.name] == \
        ["diffusion_pytorch_model.bin"]
    with pytest.raises(OSError, match=r"its weights are pickle files .*diffusion_pytorch_model.bin.*only safetensors "
                                      r"are loaded.*TROUBLESHOOTING.md#pickle-refused"):
        loading.load_sd(str(tmp_path / "pickled"))


# --- a gated model without a token -----------------------------------------------------------------------------------

def _gated_error(status: int):
    import httpx2
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/x/resolve/main/a.json"))
    if status == 403:
        return GatedRepoError("403 Client Error. Cannot access gated repo for url ...", response=response)
    return HfHubHTTPError("401 Client Error: Unauthorized for url ...", response=response)


@pytest.mark.parametrize("name, status", [("sd3-medium", 403), ("someone/private-sd-model", 401)])
def test_a_gated_model_without_a_token_says_how_to_set_the_colab_secret(monkeypatch, name, status):
    import diffusers

    monkeypatch.setenv("HELPERS_TINY", "0")  # the real hub id, not the tiny stand-in

    def refuse(*args, **kwargs):
        raise _gated_error(status)

    monkeypatch.setattr(diffusers.AutoPipelineForText2Image, "from_pretrained", refuse)
    with pytest.raises(OSError) as caught:
        loading.load_sd(name)
    message = str(caught.value)
    assert "Colab secret HF_TOKEN" in message and "TROUBLESHOOTING.md#gated-model" in message
    assert registry.resolve(name).source in message
