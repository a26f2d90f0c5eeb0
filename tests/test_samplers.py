import subprocess
import sys

import numpy as np
import pytest
import torch

import helpers
from helpers import samplers

# the model's training config, which no sampler may change: SD 1.5's and SDXL's values, which the tiny models carry
# (the schedulers' own defaults differ: linear betas, "linspace" spacing, steps_offset 0)
TRAINING = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1}


def _pipe(name):
    pipe = helpers.load_sd(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd15():
    return _pipe("sd15")


def generate(pipe, seed=0, **kwargs):
    return pipe("a photo of a cat", num_inference_steps=4, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


def check_sampler(pipe, name):
    class_name, flags = samplers.SAMPLERS[name]
    assert samplers.set_sampler(pipe, name) == name
    config = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == class_name
    assert {k: config[k] for k in flags} == flags
    assert config.get("use_karras_sigmas", False) == flags.get("use_karras_sigmas", False)
    assert {k: config.get(k) for k in TRAINING} == TRAINING
    assert samplers.sampler_name(pipe) == name
    image = generate(pipe)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_runs_on_sd15_with_its_table_flags(sd15, name):
    check_sampler(sd15, name)


# one sampler of each scheduler class (all 18 add ~3 s on 2 cores: the DPM2 ones run the UNet twice a step)
@pytest.mark.parametrize("name", ["Euler a", "Euler", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ SDE Karras",
                                  "DPM2 a Karras", "DPM2", "Heun", "LMS Karras", "DDIM", "UniPC", "PNDM"])
def test_samplers_of_every_class_run_on_sdxl(sdxl, name):
    check_sampler(sdxl, name)


def test_the_defaults_have_their_names():
    assert samplers.sampler_name(_pipe("sd15")) == "PNDM"       # diffusers' SD 1.5 default
    assert samplers.sampler_name(_pipe("sdxl")) == "Euler"


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M SDE Karras", "DPM2 a"])   # the ones that draw noise
def test_same_seed_same_image(sd15, name):
    samplers.set_sampler(sd15, name)
    np.testing.assert_array_equal(generate(sd15, seed=3), generate(sd15, seed=3))


def test_euler_and_euler_a_differ_and_only_euler_a_draws_noise(sd15):
    latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    samplers.set_sampler(sd15, "Euler")
    euler = [generate(sd15, seed=s, latents=latents) for s in (1, 2)]
    samplers.set_sampler(sd15, "Euler a")
    ancestral = [generate(sd15, seed=s, latents=latents) for s in (1, 2)]
    np.testing.assert_array_equal(euler[0], euler[1])          # deterministic: the generator is not used
    assert np.abs(ancestral[0] - ancestral[1]).max() > 1e-3    # ancestral: fresh noise from the generator each step
    assert np.abs(euler[0] - ancestral[0]).max() > 1e-3


def test_karras_on_then_off_restores_plain_sigmas(sd15):
    samplers.set_sampler(sd15, "DPM++ 2M")
    before = generate(sd15)
    samplers.set_sampler(sd15, "DPM++ 2M Karras")
    assert sd15.scheduler.config.use_karras_sigmas is True
    samplers.set_sampler(sd15, "DPM++ 2M")
    assert sd15.scheduler.config.use_karras_sigmas is False and samplers.sampler_name(sd15) == "DPM++ 2M"
    np.testing.assert_array_equal(generate(sd15), before)
    samplers.set_sampler(sd15, "DPM++ 2M SDE Karras")
    samplers.set_sampler(sd15, "UniPC")
    assert sd15.scheduler.config.use_karras_sigmas is False


def test_the_model_config_survives_swaps_and_is_remembered_from_the_first(sd15):
    import diffusers

    cfg = sd15.scheduler.config
    original = diffusers.EulerDiscreteScheduler.from_config(
        cfg, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True,
        use_karras_sigmas=True)  # a model that ships Karras sigmas: "Euler" must still mean plain Euler
    pipe = type(sd15)(**{**sd15.components, "scheduler": original})
    assert samplers.sampler_name(pipe) == "EulerDiscreteScheduler"   # no A1111 name: the class name
    for name in ["DPM++ 2M Karras", "DDIM", "Euler", "DPM++ 2M", "Euler a"]:
        samplers.set_sampler(pipe, name)
        c = pipe.scheduler.config
        assert (c.prediction_type, c.timestep_spacing, c.steps_offset, c.beta_schedule, c.rescale_betas_zero_snr) \
            == ("v_prediction", "trailing", 1, "scaled_linear", True), name
        assert c.get("use_karras_sigmas", False) is (name == "DPM++ 2M Karras"), name
    assert pipe._helpers_base_scheduler_config["_class_name"] == "EulerDiscreteScheduler"


@pytest.mark.parametrize("typed, name", [("euler a", "Euler a"), ("dpm++ 2m karras", "DPM++ 2M Karras"),
                                         ("DPM++2M  SDE", "DPM++ 2M SDE"), ("unipc", "UniPC"), ("ddim", "DDIM"),
                                         ("dpm2_a", "DPM2 a")])
def test_names_forgive_case_and_spacing(sd15, typed, name):
    assert samplers.set_sampler(sd15, typed) == name and type(sd15.scheduler).__name__ == samplers.SAMPLERS[name][0]


def test_unknown_name_lists_the_known_ones_and_suggests_the_closest(sd15):
    before = sd15.scheduler
    with pytest.raises(ValueError, match=r"Unknown sampler 'DPM\+\+ 2M Karas'\. Did you mean 'DPM\+\+ 2M Karras'\?"
                                         r" Known samplers: Euler a, Euler, DPM\+\+ 2M, .*, PNDM\."):
        samplers.set_sampler(sd15, "DPM++ 2M Karas")
    with pytest.raises(ValueError, match=r"Unknown sampler 'xyz'\. Known samplers: Euler a"):
        samplers.set_sampler(sd15, "xyz")
    assert sd15.scheduler is before


@pytest.mark.parametrize("model, cls", [("sd3-medium", "StableDiffusion3Pipeline"), ("flux-schnell", "FluxPipeline")])
def test_flow_matching_pipelines_take_only_euler(model, cls):
    pipe = _pipe(model)
    shift = pipe.scheduler.config.shift
    assert samplers.sampler_name(pipe) == "Euler"
    with pytest.raises(ValueError, match=rf"{cls} samples with a flow-matching scheduler \(FlowMatchEuler"
                                         r"DiscreteScheduler\).*'DPM\+\+ 2M Karras'.*Use sampler 'Euler'"):
        samplers.set_sampler(pipe, "dpm++ 2m karras")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert samplers.set_sampler(pipe, "euler") == "Euler"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == shift
    assert samplers.sampler_name(pipe) == "Euler"
    with pytest.raises(ValueError, match="Unknown sampler 'Eulr'. Did you mean 'Euler'"):
        samplers.set_sampler(pipe, "Eulr")


def test_import_does_not_load_torch_or_diffusers():
    code = "import sys, helpers.samplers; print([m for m in ('torch', 'diffusers') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
