import pytest

from helpers import memory, runtime

T4 = runtime.Profile(platform="colab", device="cuda", gpu_name="Tesla T4", vram_gb=15.0, compute_capability=(7, 5))


def test_llava_7b_in_nf4_matches_the_published_figure():
    """FACTS.md: LLaVA 1.6 7B in nf4 is about 4.3-4.9 GB of weights."""
    gb = memory.weights_gib(7.57, "4bit") * runtime.GB / 1e9
    assert 4.3 <= gb <= 4.9


def test_what_fits_a_t4():
    memory.check_fits("llava-1.6-mistral-7b", 7.57, "4bit", T4)
    memory.check_fits("llava-1.6-vicuna-13b", 13.4, "4bit", T4)
    with pytest.raises(ValueError, match=r"llava-1.6-mistral-7b in float16 needs about 14.1 GiB of weights \+ 1.5 GiB "
                                         r"of headroom = 15.6 GiB, more than the 15.0 GiB of this Tesla T4: use "
                                         r"quantization='4bit'"):
        memory.check_fits("llava-1.6-mistral-7b", 7.57, "float16", T4)
    with pytest.raises(ValueError, match="use a smaller model or a GPU with more memory"):
        memory.check_fits("llava-1.6-34b", 34.8, "4bit", T4)


def test_cpu_is_not_checked():
    memory.check_fits("llava-1.6-34b", 34.8, "float32", runtime.Profile(platform="local", device="cpu"))


def test_unknown_precision():
    with pytest.raises(ValueError, match="Unknown precision 'int3'"):
        memory.weights_gib(7, "int3")


@pytest.mark.parametrize("name, params_b, ram_gb, placement", [
    ("sd15", 1.07, 12.7, "gpu"), ("sdxl", 3.47, 12.7, "gpu"), ("sd3-medium", 7.7, 51.0, "model_offload")])
def test_sd_placement_on_a_t4(name, params_b, ram_gb, placement):
    t4 = runtime.Profile(platform="colab", device="cuda", gpu_name="Tesla T4", vram_gb=15.0,
                         compute_capability=(7, 5), ram_gb=ram_gb)
    assert memory.sd_placement(name, params_b, "float16", t4) == placement


def test_sd3_with_its_t5_does_not_fit_free_colab():
    """14.3 GiB of fp16 weights: over the T4's 15 GiB with headroom, and over the 12.7 GiB of RAM to offload to."""
    t4 = runtime.Profile(platform="colab", device="cuda", gpu_name="Tesla T4", vram_gb=15.0,
                         compute_capability=(7, 5), ram_gb=12.7)
    with pytest.raises(ValueError, match="sd3-medium in float16 needs about 14.3 GiB"):
        memory.sd_placement("sd3-medium", 7.7, "float16", t4)


def test_flux_fits_neither_a_t4_nor_colab_ram():
    t4 = runtime.Profile(platform="colab", device="cuda", gpu_name="Tesla T4", vram_gb=15.0,
                         compute_capability=(7, 5), ram_gb=12.7)
    with pytest.raises(ValueError, match=r"flux-schnell in float16 needs about 31.5 GiB of weights: more than the "
                                         r"15.0 GiB of this Tesla T4, and too much to offload to 12.7 GiB of RAM"):
        memory.sd_placement("flux-schnell", 16.9, "float16", t4)
    a100 = runtime.Profile(platform="local", device="cuda", gpu_name="A100", vram_gb=79.3, compute_capability=(8, 0),
                           ram_gb=200)
    assert memory.sd_placement("flux-schnell", 16.9, "bfloat16", a100) == "gpu"
    assert memory.sd_placement("flux-schnell", 16.9, "float32", runtime.Profile(platform="local", device="cpu")) \
        == "cpu"
