import pytest

from helpers import memory, planner, runtime

T4 = runtime.Profile(platform="colab", device="cuda", gpu_name="Tesla T4", vram_gb=15.0, compute_capability=(7, 5),
                     ram_gb=12.7)
A100 = runtime.Profile(platform="local", device="cuda", gpu_name="A100", vram_gb=79.3, compute_capability=(8, 0),
                       ram_gb=200)
CPU = runtime.Profile(platform="local", device="cpu", ram_gb=24)


def test_weights_come_from_the_planners_exact_counts():
    assert memory.weights_gib("llava-1.6-mistral-7b", "float16") == pytest.approx(
        7_566_747_648 * 2 / runtime.GB)
    assert memory.weights_gib("llava-1.6-mistral-7b", "4bit") < memory.weights_gib("llava-1.6-mistral-7b", "8bit") \
        < memory.weights_gib("llava-1.6-mistral-7b", "float16")
    with pytest.raises(ValueError, match="Unknown precision 'int3'"):
        memory.weights_gib("sd15", "int3")


def test_what_fits_a_t4():
    memory.check_fits("llava-1.6-mistral-7b", "4bit", T4)
    memory.check_fits("llava-1.6-vicuna-13b", "4bit", T4)
    with pytest.raises(ValueError, match=r"llava-1.6-mistral-7b in float16 needs about 14.1 GiB of weights \+ 1.2 GiB "
                                         r"of KV cache, activations and CUDA overhead = 15.3 GiB, more than the "
                                         r"15.0 GiB of this Tesla T4: use quantization='4bit'"):
        memory.check_fits("llava-1.6-mistral-7b", "float16", T4)
    with pytest.raises(ValueError, match="use a smaller model or a GPU with more memory"):
        memory.check_fits("llava-1.6-34b", "4bit", T4)


def test_cpu_is_not_checked():
    memory.check_fits("llava-1.6-34b", "float32", CPU)


def test_choose_quantization():
    assert memory.choose_quantization("llava-1.6-mistral-7b", T4) == "4bit"
    assert memory.choose_quantization("llava-1.6-34b", A100) == "none"
    assert memory.choose_quantization("llava-1.6-mistral-7b", CPU) == "none"


@pytest.mark.parametrize("name, ram_gb, placement", [
    ("sd15", 12.7, "gpu"), ("sdxl", 12.7, "gpu"), ("sd3-medium", 51.0, "model_offload")])
def test_sd_placement_on_a_t4(name, ram_gb, placement):
    t4 = runtime.Profile(platform="colab", device="cuda", gpu_name="Tesla T4", vram_gb=15.0,
                         compute_capability=(7, 5), ram_gb=ram_gb)
    assert memory.sd_placement(name, "float16", t4) == placement


def test_sd3_with_its_t5_does_not_fit_free_colab():
    """16.2 GiB of fp16 weights (T5's `wo` stays fp32 in fp16): over the T4, and over the 12.7 GiB of RAM to offload
    to; 4-bit would fit, which load_sd does not do yet, and the message says so."""
    with pytest.raises(ValueError, match=r"sd3-medium in float16 needs about 16.2 GiB.*with 4-bit nf4 of its "
                                         r"text_encoder_3 and transformer it would fit"):
        memory.sd_placement("sd3-medium", "float16", T4)


def test_flux_fits_neither_a_t4_nor_colab_ram_in_16_bit():
    with pytest.raises(ValueError, match=r"flux-schnell in float16 needs about 33.3 GiB of weights: more than the "
                                         r"15.0 GiB of this Tesla T4, and too much to offload to 12.7 GiB of RAM"):
        memory.sd_placement("flux-schnell", "float16", T4)
    assert memory.sd_placement("flux-schnell", "bfloat16", A100) == "gpu"
    assert memory.sd_placement("flux-schnell", "float32", CPU) == "cpu"
    assert planner.plan("flux-schnell", T4).verdict == "fits with 4-bit"
