import json

import pytest

from conftest import load_bench
from helpers import cli, planner, registry, runtime

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
