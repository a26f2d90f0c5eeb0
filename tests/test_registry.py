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
    ("sd-16", r"Unknown model 'sd-16'\. Did you mean 'sd15'"),
    ("", "Model name must be a catalogue name"),
    ("./no/such/folder/here", "a local folder must exist"),
])
def test_bad_names(name, message):
    with pytest.raises(ValueError, match=message):
        registry.resolve(name)


@pytest.mark.parametrize("alias, name", [
    ("sd-1.5", "sd15"), ("sd1.5", "sd15"), ("SD 1.5", "sd15"), ("sd15", "sd15"), ("Stable Diffusion v1.5", "sd15"),
    ("sdxl-base", "sdxl"), ("sdxl 1.0", "sdxl"), ("stable-diffusion-xl", "sdxl"), ("SDXL", "sdxl"),
    ("sdxl inpainting", "sdxl-inpaint"), ("SD 1.5 Inpainting", "sd15-inpaint"), ("sd3", "sd3-medium"),
    ("flux schnell", "flux-schnell"), ("FLUX.1-dev", "flux-dev"), ("llava-mistral", "llava-1.6-mistral-7b"),
    ("LLaVA 1.6", "llava-1.6-mistral-7b"), ("llava-34b", "llava-1.6-34b"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"), ("Stable-Diffusion-V1-5/stable-diffusion-v1-5", "sd15"),
    ("black-forest-labs/FLUX.1-schnell", "flux-schnell")])
def test_aliases_and_catalogue_hub_ids_are_the_catalogue_models(alias, name, monkeypatch):
    assert registry.canonical_name(alias) == name
    monkeypatch.setenv("HELPERS_TINY", "0")
    r = registry.resolve(alias)
    assert r.spec is registry.MODELS[name] and r.source == registry.MODELS[name].repo_id


def test_every_alias_names_a_catalogue_model_and_none_is_a_hub_id_or_another_name():
    squashed = {}
    for name, aliases in registry.ALIASES.items():
        assert name in registry.MODELS
        for alias in aliases:
            assert "/" not in alias and squashed.setdefault(registry._squash(alias), name) == name, alias
    assert registry.canonical_name("someone/sd15") is None and registry.canonical_name("sd-16") is None


def test_a_one_file_checkpoint_is_the_users_own_model_even_in_smoke_mode(tmp_path):
    """SMOKE MODE (HELPERS_TINY=1 here) swaps catalogue names for tiny models, never a file the user gives."""
    from helpers import loading
    from helpers.training import single_file

    path = single_file.save_single_file(loading.load_sd("sd15-inpaint", task="inpaint"),
                                        tmp_path / "my inpaint.safetensors")
    r = registry.resolve(str(path))
    assert (r.source, r.family, r.task, r.tiny, r.single_file, r.is_local) == (str(path), "sd15", "inpaint", False,
                                                                               True, True)
    assert registry.resolve(str(path), task="inpaint").task == "inpaint"


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_a_pickle_checkpoint_is_refused_with_how_to_convert_it(tmp_path, suffix):
    (tmp_path / f"model{suffix}").write_bytes(b"PK\x03\x04 pickle")
    with pytest.raises(ValueError, match=rf"model\{suffix}' is a pickle checkpoint.*\.safetensors version.*"
                                         r"from_single_file\(path\)\.save_pretrained\(folder\)"):
        registry.resolve(str(tmp_path / f"model{suffix}"))


def test_bad_task_and_family():
    with pytest.raises(ValueError, match="Unknown task 'paint'"):
        registry.resolve("sd15", task="paint")
    with pytest.raises(ValueError, match="Unknown family 'sd2'"):
        registry.resolve("a/b", family="sd2")
