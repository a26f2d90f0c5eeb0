from pathlib import Path

import pytest

from helpers import registry, tiny

REQUIRED = ["llava-1.6-mistral-7b", "llava-1.6-vicuna-7b", "llava-1.6-vicuna-13b", "llava-1.6-34b", "sd15",
            "sd15-inpaint", "sdxl", "sdxl-inpaint", "sd3-medium", "flux-schnell", "flux-dev"]


@pytest.fixture
def real_mode(monkeypatch):
    monkeypatch.setenv("HELPERS_TINY", "0")


def test_catalogue_is_complete_and_consistent():
    assert set(REQUIRED) <= set(registry.MODELS)
    for name, spec in registry.MODELS.items():
        assert spec.name == name and spec.family in registry.FAMILIES and spec.task in registry.TASKS
        assert spec.repo_id.count("/") == 1 and spec.licence and spec.params_b > 0
        assert spec.tiny in tiny.BUILDERS, f"{name} names no tiny stand-in"
    assert registry.MODELS["flux-dev"].gated and registry.MODELS["sd3-medium"].gated
    assert not registry.MODELS["sd15"].gated


def test_names_resolve_to_hub_ids(real_mode):
    r = registry.resolve("sd15")
    assert (r.source, r.family, r.task, r.tiny) == ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15",
                                                     "txt2img", False)
    r = registry.resolve("llava-1.6-mistral-7b")
    assert (r.source, r.family, r.task) == ("llava-hf/llava-v1.6-mistral-7b-hf", "llava_next", "vlm")
    assert registry.resolve("sd15", task="inpaint").task == "inpaint"


def test_raw_hub_id(real_mode):
    r = registry.resolve("someone/my-sdxl-finetune")
    assert (r.source, r.family, r.spec, r.tiny) == ("someone/my-sdxl-finetune", "sdxl", None, False)
    assert registry.resolve("someone/thing", family="sd15").family == "sd15"


def test_local_folder_resolves_with_its_family(real_mode):
    folder = tiny.ensure("sdxl-inpaint")
    r = registry.resolve(str(folder))
    assert (Path(r.source), r.family, r.task, r.is_local) == (folder, "sdxl", "inpaint", True)
    r = registry.resolve(str(tiny.ensure("llava-next-vicuna")))
    assert (r.family, r.task) == ("llava_next", "vlm")


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_tiny_switch_resolves_every_name_to_a_local_model_of_its_family(name):
    r = registry.resolve(name)
    assert r.tiny and r.is_local and r.spec is registry.MODELS[name]
    family, task = registry.family_of_folder(r.source)
    assert family == r.spec.family
    assert task == r.spec.task


@pytest.mark.parametrize("family", registry.FAMILIES)
def test_tiny_switch_resolves_raw_ids_by_family(family):
    r = registry.resolve("someone/custom-model", family=family)
    assert r.tiny and registry.family_of_folder(r.source)[0] == family


def test_tiny_switch_needs_the_family_of_an_unknown_id():
    with pytest.raises(ValueError, match="SMOKE MODE needs the family of 'someone/mystery'"):
        registry.resolve("someone/mystery")


@pytest.mark.parametrize("name, message", [
    ("sd-15", r"Unknown model 'sd-15'\. Did you mean 'sd15'"),
    ("", "Model name must be a catalogue name"),
    ("./no/such/folder/here", "a local folder must exist"),
])
def test_bad_names(name, message):
    with pytest.raises(ValueError, match=message):
        registry.resolve(name)


def test_a_single_file_is_refused_with_what_to_pass(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a single file; a model here is a diffusers/transformers folder"):
        registry.resolve(str(tmp_path / "model.safetensors"))


def test_bad_task_and_family():
    with pytest.raises(ValueError, match="Unknown task 'paint'"):
        registry.resolve("sd15", task="paint")
    with pytest.raises(ValueError, match="Unknown family 'sd2'"):
        registry.resolve("a/b", family="sd2")
