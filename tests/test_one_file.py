"""One-file checkpoints (helpers.one_file): the tiny SD 1.5, SDXL and both inpainting models written by the project's
own save_single_file and loaded back with load_sd(file) paint the folder model's image; a real-size SD 1.5 file loads
offline with no hub call; the header alone tells the family and the exact sizes (no weight read); bad files fail in
one line that names the file and the fix, leaving nothing behind."""
import builtins
import gc
import json
import socket
import struct
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from helpers import loading, one_file, planner
from helpers.training import single_file

TINY = [("sd15", "txt2img", "StableDiffusionPipeline"), ("sd15-inpaint", "inpaint", "StableDiffusionInpaintPipeline"),
        ("sdxl", "txt2img", "StableDiffusionXLPipeline"),
        ("sdxl-inpaint", "inpaint", "StableDiffusionXLInpaintPipeline")]
HUB_FUNCTIONS = ("hf_hub_download", "snapshot_download", "model_info", "get_hf_file_metadata", "list_repo_files")


@pytest.fixture
def no_hub(monkeypatch):
    """Every huggingface_hub download/metadata function (wherever a library imported it) and every socket connect
    raise: a test under this fixture proves that no hub call was made."""
    import huggingface_hub

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"the hub was contacted: {args}")

    originals = {getattr(huggingface_hub, n) for n in HUB_FUNCTIONS if hasattr(huggingface_hub, n)}
    for module in list(sys.modules.values()):
        for attr in HUB_FUNCTIONS:
            if getattr(module, attr, None) in originals:
                monkeypatch.setattr(module, attr, refuse)
    real_connect = socket.socket.connect

    def connect(sock, address, *args):   # loopback only: a test's own server on 127.0.0.1, never the hub
        if isinstance(address, tuple) and address[0] in ("127.0.0.1", "localhost", "::1"):
            return real_connect(sock, address, *args)
        return refuse(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return calls


def paint(pipe, task, seed=3):
    kw = dict(num_inference_steps=2, width=64, height=64, guidance_scale=5.0, output_type="np",
              generator=torch.Generator().manual_seed(seed))
    if task == "inpaint":
        kw.update(image=Image.new("RGB", (64, 64), (200, 40, 40)), mask_image=Image.new("L", (64, 64), 255))
    return pipe("a photo of a cat", **kw).images


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{key: (folder pipeline, its one-file checkpoint)} of the tiny models (full precision: the same weights)."""
    folder = tmp_path_factory.mktemp("one-file")
    out = {}
    for key, task, _ in TINY:
        pipe = loading.load_sd(key, task=task)
        pipe.set_progress_bar_config(disable=True)
        out[key] = pipe, single_file.save_single_file(pipe, folder / f"{key}_model.safetensors", half=False)
    return out


def header_only_file(path, tensors: dict, metadata=None, data: bool = False):
    """A safetensors file of `tensors`' names, shapes and dtypes (meta tensors allowed) with no tensor data: the
    header only (or, with `data`, a sparse data region of the right size that holds zeros)."""
    names = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, offset = {}, 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        if data:
            f.truncate(8 + len(raw) + offset)
    return path


# --- round trips -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, task, cls", TINY)
def test_a_one_file_checkpoint_paints_the_folder_models_image(files, key, task, cls, no_hub):
    folder_pipe, path = files[key]
    pipe = loading.load_sd(str(path), task=task)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == cls and pipe.dtype == torch.float32
    assert np.array_equal(paint(pipe, task), paint(folder_pipe, task))
    assert pipe._helpers_model_name == f"{key}_model" and pipe._helpers_model_file == str(path)
    assert folder_pipe._helpers_model_name == key and folder_pipe._helpers_model_file.endswith(
        "unet/diffusion_pytorch_model.safetensors")
    assert no_hub == []


@pytest.mark.parametrize("key, task, cls", [("sd15", "img2img", "StableDiffusionImg2ImgPipeline"),
                                            ("sd15", "inpaint", "StableDiffusionInpaintPipeline"),
                                            ("sdxl", "img2img", "StableDiffusionXLImg2ImgPipeline"),
                                            ("sdxl", "inpaint", "StableDiffusionXLInpaintPipeline")])
def test_img2img_and_inpaint_from_a_txt2img_file(files, key, task, cls):
    pipe = loading.load_sd(str(files[key][1]), task=task)
    assert type(pipe).__name__ == cls
    assert torch.equal(pipe.unet.conv_in.weight, files[key][0].unet.conv_in.weight)


@pytest.mark.parametrize("key", ["sd15-inpaint", "sdxl-inpaint"])
def test_txt2img_from_an_inpainting_file_is_refused_with_the_reason(files, key):
    for task in ("txt2img", "img2img"):
        with pytest.raises(ValueError, match=rf"{key}_model.safetensors' is an inpainting checkpoint \(a 9-channel "
                                             rf"UNet.*cannot do {task}: use task='inpaint'"):
            loading.load_sd(str(files[key][1]), task=task)


def test_smoke_mode_never_swaps_a_file_for_a_tiny_model(files, tmp_path):
    """A file that is not the tiny model (other weights) still loads as itself with HELPERS_TINY=1."""
    pipe, _ = files["sd15"]
    with torch.no_grad():
        pipe.unet.conv_in.weight.add_(0.5)
    try:
        path = single_file.save_single_file(pipe, tmp_path / "mine.safetensors", half=False)
    finally:
        with torch.no_grad():
            pipe.unet.conv_in.weight.sub_(0.5)
    mine = loading.load_sd(str(path))
    assert torch.equal(mine.unet.conv_in.weight, pipe.unet.conv_in.weight + 0.5)


def test_a_file_that_declares_v_prediction_gets_a_v_scheduler(files, tmp_path):
    path = single_file.save_single_file(files["sd15"][0], tmp_path / "v.safetensors",
                                        metadata={"modelspec.prediction_type": "v"})
    assert one_file.inspect(path).prediction == "v_prediction"
    assert loading.load_sd(str(path)).scheduler.config.prediction_type == "v_prediction"
    assert one_file.inspect(files["sd15"][1]).prediction is None


def test_the_real_clip_tokenizer_ships_with_the_kit():
    """The public CLIP BPE (assets/tokenizers/clip): openai/clip-vit-large-patch14's ids; OpenCLIP's pads with "!"."""
    tok = one_file.clip_tokenizer()
    assert len(tok) == 49408 and tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77 and tok.pad_token == "<|endoftext|>"
    tok2 = one_file.clip_tokenizer("!")
    assert tok2.pad_token == "!" and tok2.pad_token_id == 0
    ids = tok2("a cat", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [49406, 320, 2368, 49407] and ids[4:] == [0] * 73


# --- the header alone ----------------------------------------------------------------------------------------------

def test_the_header_tells_family_variant_and_exact_counts_without_reading_a_weight(tmp_path, monkeypatch):
    """Real-size SDXL, built on the meta device and written as a header with a sparse data region: the counts by
    component equal the catalogue's (counted from the real configs), and the plan is the catalogue model's."""
    pipe = planner.build_shape_true("sdxl", torch.float16, "meta")
    path = header_only_file(tmp_path / "juggernaut_xl.safetensors", single_file.ldm_state_dict(pipe), data=True)
    read = []
    real_open = builtins.open

    def counting_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if str(file) == str(path):
            real_read = f.read
            f.read = lambda n=-1: read.append(len(data := real_read(n))) or data  # noqa: E731
        return f

    monkeypatch.setattr(one_file, "open", counting_open, raising=False)
    info = one_file.inspect(path)
    assert (info.family, info.inpaint, info.model_type, info.dtype, info.complete) == ("sdxl", False, "xl_base",
                                                                                      "float16", True)
    assert sum(read) == 8 + info.header_bytes < 1_000_000  # of a 6.9 GB file
    for comp, counts in planner.param_counts("sdxl").items():
        assert {k: info.components[comp][k] for k in counts if k != "fp32_in_fp16"} == {
            k: v for k, v in counts.items() if k != "fp32_in_fp16"}, comp
        assert info.components[comp]["bytes"] == 2 * counts["params"]  # fp16
    mine, catalogue = planner.plan(str(path), "t4"), planner.plan("sdxl", "t4")
    assert (mine.verdict, mine.weights, mine.vram_peak, mine.resolution) == (
        catalogue.verdict, catalogue.weights, catalogue.vram_peak, 1024)
    assert mine.model == "juggernaut_xl.safetensors"
    assert "juggernaut_xl.safetensors on T4 16 GB at 1024x1024, batch 1: FITS" in planner.describe(mine)


def test_a_file_without_its_tensor_data_still_plans_and_refuses_to_load(tmp_path):
    pipe = planner.build_shape_true("sd15", torch.float16, "meta")
    tensors = single_file.ldm_state_dict(pipe)
    unet = next(k for k in tensors if k.startswith("model.diffusion_model.input_blocks.0.0."))
    tensors[unet] = torch.empty((320, 9, 3, 3), dtype=torch.float16, device="meta")  # the inpainting variant
    path = header_only_file(tmp_path / "cut.safetensors", tensors)
    info = one_file.inspect(path)
    assert (info.family, info.inpaint, info.task, info.complete) == ("sd15", True, "inpaint", False)
    p = planner.plan(str(path), "t4")
    assert p.verdict == "fits" and sum(p.weights.values()) == pytest.approx(2 * info.params)
    assert "safety_checker" not in p.weights
    with pytest.raises(ValueError, match=r"cut.safetensors' is cut short: its header promises [\d,]+ bytes and the "
                                         r"file holds [\d,]+\. Delete it and download"):
        loading.load_sd(str(path), task="inpaint")
    assert sorted(tmp_path.iterdir()) == [path]


def sd2_file(pipe, path):
    """`pipe` as one SD 2.x checkpoint file that does not say its prediction type (as most files on Civitai)."""
    safetensors.torch.save_file({k: v.contiguous() for k, v in single_file.ldm_state_dict(pipe).items()}, str(path))
    return path


@pytest.mark.parametrize("key, task, cls", [("sd2", "txt2img", "StableDiffusionPipeline"),
                                            ("sd2-inpaint", "inpaint", "StableDiffusionInpaintPipeline")])
def test_an_sd2_file_paints_the_folder_models_image(key, task, cls, tmp_path, no_hub):
    import diffusers

    from helpers import tiny

    folder_pipe = getattr(diffusers, cls).from_pretrained(tiny.ensure(key), safety_checker=None)
    folder_pipe.set_progress_bar_config(disable=True)
    path = single_file.save_single_file(folder_pipe, tmp_path / f"{key}.safetensors", half=False)
    info = one_file.inspect(path)
    assert info.prediction == folder_pipe.scheduler.config.prediction_type   # written by save_single_file
    assert (info.family, info.inpaint) == ("sd2", key == "sd2-inpaint")   # diffusers says "v1": too small
    pipe = loading.load_sd(str(path), task=task)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == cls and pipe.tokenizer.pad_token == "!"
    assert pipe.scheduler.config.prediction_type == folder_pipe.scheduler.config.prediction_type
    assert np.array_equal(paint(pipe, task), paint(folder_pipe, task)) and no_hub == []
    if key == "sd2":
        assert type(loading.load_sd(str(path), task="inpaint")).__name__ == "StableDiffusionInpaintPipeline"


def test_training_on_an_sd2_file_is_refused_before_it_loads(tmp_path):
    from conftest import draw_dataset
    from helpers import tiny
    from helpers.training import loop

    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny.ensure("sd2"), safety_checker=None)
    path = single_file.save_single_file(pipe, tmp_path / "v2.safetensors", half=False)
    dataset = draw_dataset(tmp_path / "data", [(64, 64)], ["a photo of sks"])
    config = loop.TrainConfig(dataset=str(dataset), run_dir=str(tmp_path / "run"), resolution=64, max_train_steps=1,
                              base_model=str(path))
    with pytest.raises(ValueError, match=r"v2.safetensors' is an SD 2.x checkpoint: .* Train on an SD 1.5 or SDXL"):
        loop.train_lora(config, progress=False)


@pytest.mark.parametrize("bias, prediction, size", [(-3.0, "v_prediction", 32), (3.0, "epsilon", 64)])
def test_an_sd2_file_that_does_not_say_its_prediction_is_asked_as_a1111_asks_it(bias, prediction, size, tmp_path):
    """SD 2.x's 768 px v models and 512 px -base models have the same tensors: the UNet's answer at t=999 tells them
    apart (A1111's test). A UNet whose output is a constant `bias` answers for v (below -1) or for the noise."""
    import diffusers

    from helpers import tiny

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny.ensure("sd2"), safety_checker=None)
    with torch.no_grad():
        pipe.unet.conv_out.weight.zero_()
        pipe.unet.conv_out.bias.fill_(bias)
    assert one_file.predicts_v(pipe.unet) == (prediction == "v_prediction")
    loaded = loading.load_sd(str(sd2_file(pipe, tmp_path / "unsaid.safetensors")))
    assert loaded.scheduler.config.prediction_type == prediction
    assert loaded.unet.config.sample_size == size   # the -base models paint 512 px by default (64 latents)


def test_a_real_size_sd2_header_is_matched_to_the_real_sd2_configs(tmp_path):
    """SD 2.1's architecture (assets/configs/sd2), written as a header only: detected as SD 2.x, matched to the real
    configs (UNet 865,910,724 parameters, as the hub's), planned at 768 px, and refused to load for its missing data."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = one_file.CONFIGS / "sd2"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=one_file.clip_tokenizer(),
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    path = header_only_file(tmp_path / "v2-1_768-ema-pruned.safetensors",
                            {k: v.half() for k, v in single_file.ldm_state_dict(pipe).items()})
    info = one_file.inspect(path)
    assert (info.family, info.model_type) == ("sd2", "v2")
    assert info.components["unet"]["params"] == 865_910_724
    assert one_file.config_folder(info) == configs
    assert planner.plan(str(path), "t4").resolution == 768
    with pytest.raises(ValueError, match="is cut short: its header promises"):
        loading.load_sd(str(path))


# --- the planner for any model ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("alias, name", [("SD 1.5", "sd15"), ("sd-1.5", "sd15"), ("sd1.5", "sd15"),
                                         ("sdxl-base", "sdxl"), ("SDXL 1.0", "sdxl"), ("stable-diffusion-xl", "sdxl"),
                                         ("flux schnell", "flux-schnell"), ("llava-mistral", "llava-1.6-mistral-7b"),
                                         ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
                                         ("llava-hf/llava-v1.6-mistral-7b-hf", "llava-1.6-mistral-7b")])
def test_the_planner_takes_aliases_and_catalogue_hub_ids(alias, name, no_hub):
    a, b = planner.plan(alias, "t4"), planner.plan(name, "t4")
    assert a == b and a.model == name


def test_the_planner_takes_a_local_folder():
    from helpers import tiny

    folder = tiny.ensure("sdxl")
    p = planner.plan(str(folder), "t4")
    unet = sum(x.numel() for x in loading.load_sd("sdxl").unet.parameters())
    assert p.verdict == "fits" and p.model == folder.name and p.resolution == 256
    assert p.weights["unet"] == 2 * unet
    with pytest.raises(ValueError, match="has no model_index.json"):
        planner.plan(str(folder / "unet"), "t4")


def test_the_planner_fetches_only_the_configs_of_any_other_hub_id(monkeypatch, tmp_path):
    """A hub id outside the catalogue: model_index.json and each component's config, nothing else (the hub here is
    a stand-in that serves the real SD 1.5 configs from assets/configs and records what was asked)."""
    import huggingface_hub

    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append(filename)
        source = planner.CONFIGS / "sd15" / filename
        target = tmp_path / "snapshot" / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    p = planner.plan("someone/dreamshaper-8-diffusers", "t4")
    assert p.model == "someone/dreamshaper-8-diffusers" and p.weights == planner.plan("sd15", "t4").weights
    assert asked[0] == "model_index.json" and all(f.endswith(".json") for f in asked)
    assert {"unet/config.json", "vae/config.json", "text_encoder/config.json"} <= set(asked)


def test_the_planner_offline_says_it_cannot_plan_a_hub_id_without_its_configs(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(planner.PlanUnavailable, match=r"Cannot plan 'someone/custom-model' without its "
                                                      r"model_index.json and component configs.*network access"):
        planner.plan("someone/custom-model", "t4")


# --- bad input ------------------------------------------------------------------------------------------------

def lora_file(path, kohya: bool = True):
    key = ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight" if kohya
           else "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight")
    safetensors.torch.save_file({key: torch.zeros(4, 32)}, str(path))
    return path


@pytest.mark.parametrize("make, error, message", [
    (lambda p: p.mkdir(), IsADirectoryError, r"x.safetensors' is a folder, not a checkpoint file: pass the "
                                             r"\.safetensors file itself"),
    (lambda p: p.write_bytes(b""), ValueError, r"x.safetensors' is empty \(0 bytes\).*download or copy it again"),
    (lambda p: p.write_bytes(struct.pack("<Q", 4096) + b'{"a": '), ValueError,
     r"x.safetensors' is cut short or not a safetensors file: its header would be 4,096 bytes"),
    (lambda p: p.write_bytes(struct.pack("<Q", 8) + b"not json"), ValueError, r"is not a safetensors file"),
    (lambda p: p.write_bytes(b"<!DOCTYPE html><html>Sign in to Civitai"), ValueError, r"is a web page \(HTML\)"),
    (lambda p: lora_file(p), ValueError, r"x.safetensors' is a LoRA, not a model checkpoint: .*load_lora\(pipe"),
    (lambda p: lora_file(p, kohya=False), ValueError, r"is a LoRA, not a model checkpoint"),
    (lambda p: safetensors.torch.save_file({"emb_params": torch.zeros(2, 32)}, str(p)), ValueError,
     r"is a textual-inversion embedding.*load_embedding"),
    (lambda p: safetensors.torch.save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(p)), ValueError,
     r"is not a Stable Diffusion 1.x, 2.x or SDXL checkpoint \(its keys start encoder\)"),
    (lambda p: None, FileNotFoundError, r"No file at '.*x.safetensors': check the path"),
])
def test_bad_files_fail_in_one_line_that_names_the_file_and_the_fix(tmp_path, make, error, message):
    path = tmp_path / "x.safetensors"
    make(path)
    before = sorted(tmp_path.rglob("*"))
    for call in (lambda: loading.load_sd(str(path)), lambda: planner.plan(str(path), "t4")):
        with pytest.raises(error, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    assert sorted(tmp_path.rglob("*")) == before  # nothing partial left behind


def test_a_checkpoint_where_a_lora_is_expected_is_refused(files, tmp_path):
    with pytest.raises(ValueError, match=r"sd15_model.safetensors' is a whole model checkpoint \(sd15\), not a "
                                         r"LoRA: load it as the model, load_sd"):
        one_file.check_lora(files["sd15"][1])
    assert one_file.check_lora(lora_file(tmp_path / "style.safetensors")) == "lora"


# --- real size ------------------------------------------------------------------------------------------------------

def test_a_real_size_sd15_file_loads_offline_with_no_hub_call_and_paints(tmp_path, no_hub, monkeypatch):
    """The one real-size test (~1 min, ~7 GB of RAM at its peak): SD 1.5's architecture with random weights in fp16
    (2.1 GB), written by save_single_file and freed before loading; loaded back by load_sd with the hub unreachable
    (the configs from assets/configs, the real CLIP tokenizer from assets/tokenizers); 64 px, 2 steps. Then what issue
    11 must show: `generate --model FILE` from the CLI writes A1111's Model and Model hash, and the same file behind an
    http link (a server on 127.0.0.1) is downloaded once across two runs and paints the same image."""
    import hashlib
    import http.server
    import threading
    from functools import partial

    from helpers import cli, images, storage

    pipe = planner.build_shape_true("sd15", torch.float16, "cpu")
    path = single_file.save_single_file(pipe, tmp_path / "dreamshaper_8.safetensors")
    del pipe
    gc.collect()
    info = one_file.inspect(path)
    assert info.complete and info.dtype == "float16" and info.file_bytes > 2e9
    for comp, counts in planner.param_counts("sd15").items():
        if comp != "safety_checker":
            assert info.components[comp]["params"] == counts["params"], comp
    loaded = loading.load_sd(str(path))
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "StableDiffusionPipeline" and loaded.dtype == torch.float32
    assert len(loaded.tokenizer) == 49408 and loaded.safety_checker is None
    assert sum(p.numel() for p in loaded.unet.parameters()) == 859_520_964
    image = paint(loaded, "txt2img")
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert loaded._helpers_model_name == "dreamshaper_8" and no_hub == []
    del loaded
    gc.collect()

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    short = digest.hexdigest()[:10]
    monkeypatch.setenv(storage.ENV_HOME, str(tmp_path / "home"))

    def cli_image(model, out):
        assert cli.main(["generate", "a lighthouse", "--model", model, "--steps", "2", "--width", "64", "--height",
                         "64", "--seed", "3", "--out", str(tmp_path / out)]) == 0
        [png] = (tmp_path / out).glob("*.png")
        return images.read_parameters(png), np.asarray(Image.open(png))

    parameters, from_file = cli_image(str(path), "from-file")
    assert parameters["Model"] == "dreamshaper_8" and parameters["Model hash"] == short

    gets = []

    class Files(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            gets.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Files, directory=str(tmp_path)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        link = f"http://127.0.0.1:{httpd.server_address[1]}/dreamshaper_8.safetensors"
        for run in ("link-1", "link-2"):   # two runs: the second downloads nothing
            parameters, from_link = cli_image(link, run)
            assert parameters["Model"] == "dreamshaper_8" and parameters["Model hash"] == short
            assert np.array_equal(from_link, from_file)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert len([g for g in gets if "dreamshaper_8.safetensors" in g]) == 1 and no_hub == []
