"""GGUF FLUX transformers (helpers.gguf): a tiny file written with the gguf package loads into its base pipeline
through diffusers' GGUFQuantizationConfig and generates; damaged or foreign files are named with the fix."""
import sys

import numpy as np
import pytest

from helpers import diffusion, gguf, loading, memory, tiny


def _gen(pipe):
    return np.asarray(diffusion.generate(pipe, "a photo of a cat", num_inference_steps=2, seed=3,
                                         progress=False).images[0], dtype=float)


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    return tiny.write_gguf("flux", tmp_path_factory.mktemp("gguf") / "flux-tiny-Q8_0.gguf", "Q8_0")


def test_inspect_reads_the_base_and_the_types_from_names_only(q8, tmp_path):
    info = gguf.inspect(q8)
    assert (info.family, info.base, info.quant_types[0], info.precision) == ("flux", "flux-schnell", "Q8_0", "8bit")
    dev = gguf.inspect(tiny.write_gguf("flux-dev", tmp_path / "dev.gguf", "F16"))
    assert (dev.base, dev.quant_types[0], dev.precision) == ("flux-dev", "F16", "none")


def test_a_q8_file_loads_into_its_base_and_generates(q8):
    pipe = loading.load_sd(str(q8))
    assert type(pipe).__name__ == "FluxPipeline" and pipe._helpers_model_name == "flux-tiny-Q8_0"
    assert "GGUFLinear" in {type(m).__name__ for m in pipe.transformer.modules()}
    assert "GGUFParameter" in {type(p).__name__ for p in pipe.transformer.parameters()}
    assert pipe._helpers_model_file == str(q8) and pipe._helpers_route == memory.Route("cpu")
    base = _gen(loading.load_sd("flux-schnell"))
    image = _gen(pipe)
    assert image.shape == (64, 64, 3) and 0 < np.abs(image - base).mean() < 8  # Q8_0: close to the 32-bit weights


def test_an_f32_file_gives_the_base_models_image(tmp_path):
    path = tiny.write_gguf("flux", tmp_path / "f32.gguf", "F32")
    assert np.array_equal(_gen(loading.load_sd(str(path))), _gen(loading.load_sd("flux-schnell")))


def test_gguf_on_the_staged_route(q8):
    pipe = loading.load_sd(str(q8), route="staged")
    assert pipe.text_encoder is None and np.isfinite(_gen(pipe)).all()


def test_a_cut_file_and_a_foreign_file_are_named_with_the_fix(q8, tmp_path):
    data = q8.read_bytes()
    for i, size in enumerate((len(data) // 2, 100, 3)):
        cut = tmp_path / f"cut{i}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(OSError, match=rf"cut{i}.gguf' is not a complete GGUF file .*Download it again"):
            loading.load_sd(str(cut))
    import gguf as gguf_package

    other = tmp_path / "llm.gguf"
    writer = gguf_package.GGUFWriter(str(other), arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match="llm.gguf' is not a FLUX transformer GGUF"):
        loading.load_sd(str(other))


def test_without_the_gguf_package(q8, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="needs the gguf package: pip install gguf"):
        loading.load_sd(str(q8))
