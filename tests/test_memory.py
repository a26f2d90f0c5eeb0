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
