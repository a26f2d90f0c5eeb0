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


@pytest.mark.parametrize("name, ram_gb, quantization, placement", [
    ("sd15", 12.7, "auto", "gpu"), ("sdxl", 12.7, "auto", "gpu"),
    # with RAM to spare, SD3 in 16 bit is offloaded where 4-bit is not allowed; allowed, 4-bit all on the GPU comes
    # first (the faster route: planner.ROUTES; this was "model_offload" before issue 12 added the 4-bit routes)
    ("sd3-medium", 51.0, "none", "model_offload"), ("sd3-medium", 51.0, "auto", "gpu"),
    ("sd3-medium", 12.7, "auto", "gpu"), ("flux-dev", 12.7, "auto", "staged"), ("flux-schnell", 51.0, "auto",
                                                                                  "model_offload")])
def test_sd_placement_on_a_t4(name, ram_gb, quantization, placement):
    t4 = runtime.Profile(platform="colab", device="cuda", gpu_name="Tesla T4", vram_gb=15.0,
                         compute_capability=(7, 5), ram_gb=ram_gb)
    assert memory.sd_placement(name, "float16", t4, quantization) == placement


def test_sd3_with_its_t5_fits_free_colab_in_4_bit_only():
    """16.2 GiB of fp16 weights (T5's `wo` stays fp32 in fp16): over the T4, and over the 12.7 GiB of RAM to offload
    to. Before issue 12 this was refused ("load_sd does not quantize yet"); now the 4-bit route all on the GPU fits,
    and the refusal stays where 4-bit is not allowed, with the figures."""
    route = memory.sd_route("sd3-medium", "float16", T4)
    assert (route.name, route.quantization, route.quantized) == ("gpu", "4bit", ("text_encoder_3", "transformer"))
    assert route.vram_gib <= 15.0 and route.ram_gib <= 12.7
    with pytest.raises(ValueError, match=r"sd3-medium in float16 fits no route on the 15.0 GiB of this Tesla T4: the "
                                         r"nearest \(staged, 16-bit\) needs .* GiB of RAM \(has 12.70 GiB\): allow "
                                         r"4-bit: quantization='auto' or '4bit'"):
        memory.sd_placement("sd3-medium", "float16", T4, "none")


def test_flux_fits_a_t4_staged_in_4_bit_only():
    """Before issue 12: refused ("33.3 GiB of weights: more than the 15.0 GiB of this Tesla T4, and too much to
    offload to 12.7 GiB of RAM"). Now staged in 4-bit; 16-bit still fits no route."""
    assert memory.sd_placement("flux-schnell", "float16", T4) == "staged"
    with pytest.raises(ValueError, match=r"flux-schnell in float16 fits no route on the 15.0 GiB of this Tesla T4"):
        memory.sd_placement("flux-schnell", "float16", T4, "none")
    assert memory.sd_placement("flux-schnell", "bfloat16", A100) == "gpu"
    assert memory.sd_placement("flux-schnell", "float32", CPU) == "cpu"
    assert planner.plan("flux-schnell", T4).verdict == "fits with 4-bit"
