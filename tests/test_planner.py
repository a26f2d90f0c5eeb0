import json

import pytest

from conftest import load_bench
from helpers import cli, memory, planner, registry, runtime

GB = 1e9


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_cached_counts_equal_the_meta_device_models(name):
    """param_counts.json is what the real architectures, built on the meta device now, count."""
    assert planner.param_counts(name) == planner.count_params(name)


def test_counts_are_the_published_sizes():
    counts = {name: planner.param_counts(name) for name in registry.MODELS}
    assert counts["sd15"]["unet"]["params"] == 859_520_964          # diffusers' SD 1.5 UNet
    assert counts["sdxl"]["unet"]["params"] == 2_567_463_684        # diffusers' SDXL base UNet
    assert planner.total_params("llava-1.6-mistral-7b") == 7_566_747_648  # the llava-hf model card
    assert counts["sd15-inpaint"]["unet"]["params"] - counts["sd15"]["unet"]["params"] == 5 * 320 * 3 * 3  # 9 inputs
    for name in ("llava-1.6-vicuna-7b", "llava-1.6-vicuna-13b", "llava-1.6-34b", "sdxl", "sd3-medium", "flux-schnell"):
        assert planner.total_params(name) / GB == pytest.approx(registry.MODELS[name].params_b, rel=0.01)
    assert counts["flux-schnell"]["transformer"]["params"] / GB == pytest.approx(11.9, rel=0.01)
    assert counts["sd3-medium"]["transformer"]["params"] / GB == pytest.approx(2.03, rel=0.01)
    # T5-XXL's encoder, its embeddings shared once (accelerate's init_empty_weights undoes transformers 5's tying:
    # the planner ties again, else 131.6M parameters would count twice)
    assert counts["flux-schnell"]["text_encoder_2"]["params"] == 4_762_310_656
    assert counts["flux-schnell"]["text_encoder_2"]["fp32_in_fp16"] == 24 * 4096 * 10240  # T5's `wo` stays fp32


# --- published figures (FACTS.md, "T4 figures from public sources") -----------------------------------------------

def test_llava_7b_in_nf4_matches_the_published_figure():
    """Published: 4.3-4.9 GB of weights for LLaVA 1.6 Mistral 7B. Margin: 5% either side of that range (nf4 constants
    and which layers stay 16-bit differ between bitsandbytes/transformers versions). Vicuna 7B, with a smaller MLP,
    comes out 0.26 GB lighter."""
    gb = {name: planner.weights_gib(name, "4bit") * runtime.GB / GB
          for name in ("llava-1.6-mistral-7b", "llava-1.6-vicuna-7b")}
    assert 4.3 * 0.95 <= gb["llava-1.6-mistral-7b"] <= 4.9 * 1.05
    assert gb["llava-1.6-vicuna-7b"] == pytest.approx(gb["llava-1.6-mistral-7b"] - 0.26, abs=0.02)


def test_sd15_and_sdxl_in_fp16_fit_a_t4():
    """Published: both run in fp16 on a T4 (diffusers' T4 figures, 512 px and 1024 px). Margin: the plan keeps at
    least 1 GiB of the T4's 15 GiB free, so the verdict survives activation estimates 1 GiB too low."""
    for name in ("sd15", "sdxl"):
        p = planner.plan(name, "t4")
        assert (p.verdict, p.dtype, p.offload, p.quantization) == ("fits", "float16", False, None)
        assert p.vram_peak <= p.vram_total - 1 * runtime.GB and p.ram_peak <= p.ram_total


def test_sd3_with_t5_does_not_fit_free_colab_without_offload_or_4bit():
    """Published: SD3 medium with its T5 does not fit free Colab as it is. Margin: over by more than 1 GiB."""
    p = planner.plan("sd3-medium", "t4")
    assert p.verdict == "fits with 4-bit" and "text_encoder_3" in p.quantized
    assert sum(planner.weights("sd3-medium", "float16").values()) > (15 + 1) * runtime.GB


def test_flux_needs_about_31_gib_in_bf16():
    """Published: ~31 GiB of bf16 weights. Margin: 5%."""
    assert planner.weights_gib("flux-schnell", "bfloat16") == pytest.approx(31, rel=0.05)
    assert planner.plan("flux-schnell", "a100-40").verdict == "fits"
    assert planner.plan("flux-schnell", "t4").verdict == "fits with 4-bit"


def test_dreambooth_full_fine_tune_of_sd15_matches_the_published_figure():
    """Published: 9.92 GB on a T4 (fp16 mixed precision, 8-bit Adam, gradient checkpointing). Margin: 15% (the
    activation estimate and the allocator's cache are the uncertain parts)."""
    gb = planner.training_bytes("sd15", optimizer="adamw8bit") / GB
    assert gb == pytest.approx(9.92, rel=0.15)
    assert planner.training_bytes("sd15", optimizer="adamw") > planner.training_bytes("sd15", optimizer="adamw8bit")


# --- the parts of a plan ----------------------------------------------------------------------------------------

def test_bytes_by_precision():
    c = {"params": 1000, "quantizable": 800, "fp32_in_fp16": 100}
    assert planner.component_bytes(c, "float32") == 4000
    assert planner.component_bytes(c, "bfloat16") == 2000
    assert planner.component_bytes(c, "float16") == 2200            # the fp32-kept modules
    assert planner.component_bytes(c, "8bit", "bfloat16") == 200 * 2 + 800
    assert planner.component_bytes(c, "4bit", "bfloat16") == pytest.approx(200 * 2 + 800 * (0.5 + 1 / 64 + 1 / 4096))
    with pytest.raises(ValueError, match="Unknown precision 'int3'"):
        planner.component_bytes(c, "int3")


def test_activations_grow_with_size_and_batch_and_shrink_with_slicing_and_tiling():
    a = planner.diffusion_activations
    assert a("sdxl", 1024, 1, "float16")["vae_decode"] == 4 * a("sdxl", 512, 1, "float16")["vae_decode"]
    assert a("sdxl", 1024, 4, "float16")["denoiser"] == 4 * a("sdxl", 1024, 1, "float16")["denoiser"]
    assert a("sdxl", 1024, 4, "float16", vae_slicing=True)["vae_decode"] == a("sdxl", 1024, 1, "float16")["vae_decode"]
    assert a("sd15", 2048, 1, "float16", vae_tiling=True)["vae_decode"] < a("sd15", 2048, 1, "float16")["vae_decode"]
    assert a("flux-schnell", 1024, 1, "bfloat16")["denoiser"] > 0
    # Vicuna 7B has no grouped-query attention: 4 times the KV cache of Mistral 7B (8 KV heads of 32)
    kv = {n: planner.llava_activations(n, "float16")["kv_cache"] for n in ("llava-1.6-vicuna-7b",
                                                                           "llava-1.6-mistral-7b")}
    assert kv["llava-1.6-vicuna-7b"] == 4 * kv["llava-1.6-mistral-7b"]


def test_the_plan_turns_on_vae_slicing_for_a_large_batch_and_says_when_nothing_fits():
    assert not planner.plan("sdxl", "t4", batch=1).vae_slicing
    assert planner.plan("sdxl", "t4", batch=8).vae_slicing
    p = planner.plan("llava-1.6-34b", "t4")
    assert p.verdict == "does not fit" and not p.fits and p.how() == "-"
    assert planner.plan("llava-1.6-34b", "a100-40").quantization == "4bit"
    assert planner.plan("sd15", "cpu").dtype == "float32"


def test_profiles_by_name():
    t4 = planner.profile("t4")
    assert isinstance(t4, runtime.Profile) and t4.device == "cuda" and t4.dtype_name == "float16"
    assert (t4.vram_gb, t4.ram_gb) == (15.0, 12.7)
    assert planner.profile("a100-80").dtype_name == "bfloat16" and planner.profile("cpu").device == "cpu"
    with pytest.raises(ValueError, match="Unknown GPU profile 'h100'; known: t4, l4, a100-40, a100-80, cpu"):
        planner.profile("h100")
    with pytest.raises(ValueError, match="No architecture configs for 'sd2'"):
        planner.plan("sd2")
    with pytest.raises(ValueError, match="`resolution` has to be divisible by 8 but is 1001"):
        planner.plan("sdxl", resolution=1001)


# --- CLI, README table, shape-true pipelines ------------------------------------------------------------------

def test_cli_plan_prints_the_plan(capsys):
    assert cli.main(["plan", "sd3-medium", "--gpu", "t4"]) == 0
    out = capsys.readouterr().out
    assert "sd3-medium on T4 16 GB at 1024x1024, batch 1: FITS WITH 4-BIT" in out
    assert "text_encoder_3" in out and "RAM peak" in out and "plan: float16, 4-bit nf4" in out
    assert cli.main(["plan", "sdxl", "--gpu", "a100-80", "--resolution", "512", "--batch", "2"]) == 0
    assert "at 512x512, batch 2: FITS" in capsys.readouterr().out
    assert cli.main(["plan", "nope"]) == 2
    assert "No architecture configs for 'nope'" in capsys.readouterr().err


def test_readme_table_is_what_the_script_writes_now():
    script = load_bench("plan_table")
    readme = script.README.read_text()
    assert script.START in readme and script.table().splitlines()[0] in readme
    assert readme == script.readme_with_table(readme), "stale: run python bench/plan_table.py"
    assert script.OUT.read_text() == script.document(), "stale: run python bench/plan_table.py"


@pytest.mark.parametrize("name, cls", [("sd15", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline"),
                                       ("sd3-medium", "StableDiffusion3Pipeline"), ("flux-schnell", "FluxPipeline")])
def test_shape_true_pipelines_have_the_real_sizes(name, cls):
    """Built on the meta device here (no memory); the benchmark builds them on the GPU."""
    import torch

    pipe = planner.build_shape_true(name, torch.float16, "meta")
    assert type(pipe).__name__ == cls and pipe.vae.dtype == torch.float16
    for comp, counts in planner.param_counts(name).items():
        if comp != "safety_checker":  # not built: the benchmark measures generation, not the NSFW filter
            model = getattr(pipe, comp)
            assert sum(p.numel() for p in model.parameters()) == counts["params"], comp
            assert {p.device.type for p in model.parameters()} == {"meta"}
    ids = pipe.tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and max(ids) < pipe.text_encoder.config.vocab_size


def test_configs_are_small_files_in_the_hub_layout():
    for name in registry.MODELS:
        folder = planner.config_dir(name)
        files = list(folder.rglob("*.json"))
        assert all(f.stat().st_size < 20_000 for f in files)
        if registry.MODELS[name].family == "llava_next":
            assert json.loads((folder / "config.json").read_text())["model_type"] == "llava_next"
        else:
            index = json.loads((folder / "model_index.json").read_text())
            assert all((folder / comp).is_dir() for comp, v in index.items() if isinstance(v, list)
                       and not comp.startswith(("tokenizer", "feature_extractor")))


# --- loading routes: VRAM and RAM (issue 12) ------------------------------------------------------------------------

DIFFUSION = [name for name, spec in registry.MODELS.items() if spec.family != "llava_next"]
# the documented route (planner.ROUTES: the first that fits VRAM and RAM; 16-bit before 4-bit within a route)
ROUTE = {("sd3-medium", "t4"): ("gpu", "4bit"), ("flux-schnell", "t4"): ("staged", "4bit"),
         ("flux-dev", "t4"): ("staged", "4bit"), ("flux-schnell", "l4"): ("gpu", "4bit"),
         ("flux-dev", "l4"): ("gpu", "4bit")}  # every other (model, GPU): all on the GPU in 16 bit


@pytest.mark.parametrize("gpu", ["t4", "l4", "a100-40", "a100-80"])
@pytest.mark.parametrize("name", DIFFUSION)
def test_each_model_gets_its_documented_route_within_vram_and_ram(name, gpu):
    p = planner.plan(name, gpu)
    assert (p.route, p.quantization or None) == ROUTE.get((name, gpu), ("gpu", None))
    assert p.vram_peak <= p.vram_total and p.ram_peak <= p.ram_total
    route = memory.sd_route(name, p.dtype, planner.profile(gpu))
    assert (route.name, route.quantization, route.quantized) == (p.route, p.quantization or "none", p.quantized)
    assert route.ram_gib <= planner.GPUS[gpu].ram_gb and route.vram_gib <= planner.GPUS[gpu].vram_gb
    if p.quantization:  # the denoiser and, where there is one, the T5 encoder: what load_sd quantizes
        assert set(p.quantized) == {"transformer", "text_encoder_3" if name == "sd3-medium" else "text_encoder_2"}


def test_why_flux_is_staged_on_a_t4():
    """FACTS.md: whole-pipeline nf4 FLUX peaks ~17 GB on an H100 (more than a T4's 15 GiB); with model offload it
    crashed free Colab's 12.7 GB of RAM; staged fits. The planner reproduces each: on a T4 with RAM to spare it would
    offload (needing more than 12.7 GiB of RAM), on a 24 GiB GPU it would run all on the GPU (needing more than 15 GiB
    of VRAM: 17.0, the published 17.28 being without double quant)."""
    t4 = planner.profile("t4")
    roomy_t4 = runtime.Profile(platform="plan", device="cuda", gpu_name="T4", vram_gb=15.0, compute_capability=(7, 5),
                               gpu_count=1, ram_gb=51.0)
    big_gpu = runtime.Profile(platform="plan", device="cuda", gpu_name="24 GiB", vram_gb=24.0,
                              compute_capability=(7, 5), gpu_count=1, ram_gb=12.7)
    offload = planner.plan("flux-dev", roomy_t4)
    assert (offload.route, offload.quantization) == ("model_offload", "4bit")
    assert offload.ram_peak > t4.ram_gb * runtime.GB
    whole = planner.plan("flux-dev", big_gpu)
    assert (whole.route, whole.quantization) == ("gpu", "4bit")
    assert 16.0 * runtime.GB < whole.vram_peak < 17.5 * runtime.GB
    staged = planner.plan("flux-dev", t4)
    assert staged.route == "staged" and staged.ram_peak < t4.ram_gb * runtime.GB < offload.ram_peak


def test_staged_peak_is_the_larger_stage_not_the_sum():
    """Each stage worked out here from the weights and the constants: encode = the CLIP encoder (loaded to RAM) and
    the 4-bit T5 (to the GPU a 5 GB transformers shard at a time); denoise = the 4-bit transformer (a 10 GB diffusers
    shard at a time, then held in RAM by model offload) and the VAE."""
    p = planner.plan("flux-dev", "t4")
    w, w16 = planner.weights("flux-dev", "float16", "4bit"), planner.weights("flux-dev", "float16")
    base, cuda = planner.RAM_BASE_GIB * runtime.GB, planner.CUDA_OVERHEAD_GIB * runtime.GB
    act = planner.diffusion_activations("flux-dev", 1024, 1, "float16")
    encode_ram = base + w["text_encoder"] + min(w16["text_encoder_2"], 5e9)
    denoise_ram = base + max(w["transformer"] + w["vae"], w["vae"] + min(w16["transformer"], 10e9))
    encode_vram = cuda + w["text_encoder"] + w["text_encoder_2"]
    denoise_vram = cuda + max(w["transformer"] + act["denoiser"] + act["latents"], w["vae"] + act["vae_decode"])
    assert p.stages["encode"] == (pytest.approx(encode_vram), pytest.approx(encode_ram))
    assert p.stages["denoise"] == (pytest.approx(denoise_vram), pytest.approx(denoise_ram))
    assert p.ram_peak == pytest.approx(max(encode_ram, denoise_ram))
    assert p.vram_peak == pytest.approx(max(encode_vram, denoise_vram))
    assert p.ram_peak < encode_ram + denoise_ram - base and p.vram_peak < encode_vram + denoise_vram - cuda


def test_ram_of_the_other_routes():
    """gpu: 16-bit weights pass through RAM whole (from_pretrained, then .to("cuda")); quantized ones go to the GPU
    a shard at a time. model_offload: every weight stays in RAM."""
    base = planner.RAM_BASE_GIB * runtime.GB
    sdxl = planner.plan("sdxl", "t4")
    assert sdxl.route == "gpu" and sdxl.ram_peak == pytest.approx(sum(sdxl.weights.values()) + base)
    sd3 = planner.plan("sd3-medium", "t4")
    w16 = planner.weights("sd3-medium", "float16")
    unquantized = sum(b for c, b in sd3.weights.items() if c not in sd3.quantized)
    assert sd3.ram_peak == pytest.approx(unquantized + base + max(min(w16["text_encoder_3"], 5e9),
                                                                  min(w16["transformer"], 10e9)))
    roomy = runtime.Profile(platform="plan", device="cuda", gpu_name="T4", vram_gb=15.0, compute_capability=(7, 5),
                            gpu_count=1, ram_gb=51.0)
    offload = planner.plan("sd3-medium", roomy, quantization="none")
    assert offload.route == "model_offload" and offload.ram_peak == pytest.approx(sum(offload.weights.values()) + base)
    assert offload.vram_peak < planner.plan("sd3-medium", roomy, quantization="none").vram_total


def test_explicit_quantization_is_honoured():
    t4 = planner.profile("t4")
    short = lambda r: (r.name, r.quantization, r.quantized)  # noqa: E731
    assert short(memory.sd_route("sdxl", "float16", t4, "4bit")) == ("gpu", "4bit", ("unet",))
    assert short(memory.sd_route("sdxl", "float16", t4, "none")) == ("gpu", "none", ())
    assert short(memory.sd_route("flux-dev", "bfloat16", planner.profile("a100-80"), "8bit")) == (
        "gpu", "8bit", ("text_encoder_2", "transformer"))
    assert short(memory.sd_route("flux-dev", "float32", planner.profile("cpu"), "4bit"))[:2] == ("cpu", "4bit")
    assert memory.sd_route("flux-dev", "float32", planner.profile("cpu")).quantization == "none"  # auto: none on CPU
    assert memory.sd_placement("sd3-medium", "float16", t4, "4bit") == "gpu"
    with pytest.raises(ValueError, match=r"flux-dev in float16 fits no route on the 15.0 GiB of this T4 16 GB: the "
                                         r"nearest \(staged, 16-bit\) needs 23.7\d GiB of VRAM \(has 15.00 GiB\) and "
                                         r"23.8\d GiB of RAM \(has 12.70 GiB\): allow 4-bit: quantization='auto' or "
                                         r"'4bit'\."):
        memory.sd_route("flux-dev", "float16", t4, "none")
    with pytest.raises(ValueError, match="`quantization` must be one of auto, none, 4bit, 8bit, not '3bit'"):
        memory.sd_route("flux-dev", "float16", t4, "3bit")
    with pytest.raises(ValueError, match="`quantization` must be one of auto, none, 4bit, 8bit, not '3bit'"):
        planner.plan("flux-dev", "t4", quantization="3bit")


def test_where_nothing_fits_the_refusal_has_the_figures():
    small = runtime.Profile(platform="plan", device="cuda", gpu_name="Tiny GPU", vram_gb=4.0,
                            compute_capability=(7, 5), gpu_count=1, ram_gb=6.0)
    p = planner.plan("flux-dev", small)
    assert p.verdict == "does not fit" and not p.fits
    need_vram, need_ram = (f"{b / runtime.GB:.2f}" for b in (p.vram_peak, p.ram_peak))
    with pytest.raises(ValueError) as e:
        memory.sd_route("flux-dev", "float16", small)
    assert str(e.value) == (
        f"flux-dev in float16 fits no route on the 4.0 GiB of this Tiny GPU: the nearest (staged with 4-bit nf4 "
        f"text_encoder_2 and transformer) needs {need_vram} GiB of VRAM (has 4.00 GiB) and {need_ram} GiB of RAM "
        f"(has 6.00 GiB): use a smaller model, or a GPU of at least {need_vram} GiB and {need_ram} GiB of RAM.")
    assert p.vram_peak > small.vram_gb * runtime.GB and p.ram_peak > small.ram_gb * runtime.GB
    assert "route staged" in planner.describe(p)


def test_flux_activations_match_the_published_measurement():
    """Published (diffusers' quantization benchmark, FLUX.1-dev at 1024 px in bf16 on an H100): 31.45 GiB after
    loading in bf16 and 36.17 GiB at the peak (the VAE decode: +4.70 GiB); with model offload 23.27 GiB (the
    transformer's 22.17 GiB + 1.1 GiB). Margin: 2% for the weights, 10% for the activations."""
    act = planner.diffusion_activations("flux-dev", 1024, 1, "bfloat16")
    assert planner.weights_gib("flux-dev", "bfloat16") == pytest.approx(31.45, rel=0.02)
    assert act["vae_decode"] / runtime.GB == pytest.approx(4.70, rel=0.1)
    assert (act["denoiser"] + act["latents"]) / runtime.GB == pytest.approx(1.1, rel=0.1)


def test_cli_plan_shows_the_route(capsys):
    assert cli.main(["plan", "flux-dev", "--gpu", "t4"]) == 0
    out = capsys.readouterr().out
    assert "FITS WITH 4-BIT" in out and "plan: float16, 4-bit nf4 (text_encoder_2, transformer)" in out
    assert "route: staged (the text encoders load, encode the prompts and are freed" in out
    assert "stages (the peak is the larger): encode VRAM" in out and "RAM peak 10.97 GiB of 12.70 GiB" in out


def test_cli_plan_takes_a_quantization(capsys):
    assert cli.main(["plan", "flux-dev", "--gpu", "t4", "--quantization", "none"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out   # no 16-bit route fits a T4
    assert cli.main(["plan", "sd15", "--gpu", "t4", "--quantization", "4bit"]) == 0
    assert "4-bit nf4 (unet)" in capsys.readouterr().out


def test_a_qlora_fine_tune_of_llava_is_planned_by_its_tokens(capsys):
    small, large = (planner.llava_training("llava-1.6-mistral-7b", "t4", tokens=t) for t in (1200, 3184))
    assert small["fits"] and large["fits"] and small["total"] < large["total"]   # fewer image tokens, less memory
    assert large["weights"] == pytest.approx(sum(planner.weights("llava-1.6-mistral-7b", "float16", "4bit").values()))
    assert large["logits"] == 3184 * 32064 * 8
    assert not planner.llava_training("llava-1.6-34b", "t4")["fits"]
    assert cli.main(["plan", "llava-1.6-34b", "--gpu", "t4", "--train", "qlora"]) == 0
    out = capsys.readouterr().out
    assert "QLoRA fine-tune" in out and "DOES NOT FIT" in out and "a lower image budget" in out
    with pytest.raises(ValueError, match="`tokens` must be a positive whole number"):
        planner.llava_training("llava-1.6-mistral-7b", "t4", tokens=0)
