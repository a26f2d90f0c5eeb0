import re
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


def check_sampler(pipe, name, schedule="Uniform"):
    class_name, flags = samplers.SAMPLERS[name]
    assert samplers.set_sampler(pipe, name, schedule) == name
    config = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == class_name
    assert {k: config[k] for k in flags} == flags
    assert config.get("use_karras_sigmas", False) is (samplers.resolve(name, schedule) == "Karras")
    expected = TRAINING | ({"timestep_spacing": "linspace"} if schedule == "Uniform" else {})
    assert {k: config.get(k) for k in TRAINING} == expected
    assert samplers.sampler_name(pipe) == name
    image = generate(pipe)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_runs_on_sd15_with_its_table_flags(sd15, name):
    check_sampler(sd15, name, "Automatic" if name == "DPM++ SDE" else "Uniform")   # Singlestep has no spacing


# one sampler of each scheduler class (all add ~3 s on 2 cores: the DPM2 ones run the UNet twice a step)
@pytest.mark.parametrize("name", ["Euler a", "Euler", "DPM++ 2M", "DPM++ 2M SDE", "DPM2 a", "Heun", "LMS", "DDIM",
                                  "UniPC", "PLMS", "LCM"])
def test_samplers_of_every_class_run_on_sdxl(sdxl, name):
    check_sampler(sdxl, name)


def test_the_defaults_have_their_names():
    assert samplers.sampler_name(_pipe("sd15")) == "PLMS"       # diffusers' SD 1.5 default, PNDM: A1111's PLMS
    assert samplers.sampler_name(_pipe("sdxl")) == "Euler"


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M SDE Karras", "DPM2 a", "DPM++ 3M SDE"])   # they draw noise
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
    samplers.set_sampler(sd15, "DPM++ 2M", "Uniform")
    before = generate(sd15)
    samplers.set_sampler(sd15, "DPM++ 2M Karras")
    assert sd15.scheduler.config.use_karras_sigmas is True and samplers.schedule_type(sd15) == "Karras"
    samplers.set_sampler(sd15, "DPM++ 2M", "Uniform")
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
    assert (samplers.sampler_name(pipe), samplers.schedule_type(pipe)) == ("Euler", "Karras")   # read from its flags
    for name in ["DPM++ 2M Karras", "DDIM", "Euler", "DPM++ 2M Exponential", "Euler a"]:
        samplers.set_sampler(pipe, name)
        c = pipe.scheduler.config
        assert (c.prediction_type, c.timestep_spacing, c.steps_offset, c.beta_schedule, c.rescale_betas_zero_snr) \
            == ("v_prediction", "trailing", 1, "scaled_linear", True), name
        assert c.get("use_karras_sigmas", False) is (name == "DPM++ 2M Karras"), name
    assert pipe._helpers_base_scheduler_config["_class_name"] == "EulerDiscreteScheduler"


@pytest.mark.parametrize("typed, name", [("euler a", "Euler a"), ("dpm++ 2m karras", "DPM++ 2M"),
                                         ("DPM++2M  SDE", "DPM++ 2M SDE"), ("unipc", "UniPC"), ("ddim", "DDIM"),
                                         ("dpm2_a", "DPM2 a")])
def test_names_forgive_case_and_spacing(sd15, typed, name):
    assert samplers.set_sampler(sd15, typed) == name and type(sd15.scheduler).__name__ == samplers.SAMPLERS[name][0]


def test_unknown_name_lists_the_known_ones_and_suggests_the_closest(sd15):
    before = sd15.scheduler
    with pytest.raises(ValueError, match=r"Unknown sampler 'DPM\+\+ 2M Karas'\. Did you mean 'DPM\+\+ 2M'\?"
                                         r" Known samplers: DPM\+\+ 2M, DPM\+\+ SDE, .*, LCM\."):
        samplers.set_sampler(sd15, "DPM++ 2M Karas")
    with pytest.raises(ValueError, match=r"Unknown sampler 'xyz'\. Known samplers: DPM\+\+ 2M"):
        samplers.set_sampler(sd15, "xyz")
    assert sd15.scheduler is before


@pytest.mark.parametrize("model, cls", [("sd3-medium", "StableDiffusion3Pipeline"), ("flux-schnell", "FluxPipeline")])
def test_flow_matching_pipelines_take_only_euler(model, cls):
    pipe = _pipe(model)
    shift = pipe.scheduler.config.shift
    assert samplers.sampler_name(pipe) == "Euler"
    with pytest.raises(ValueError, match=rf"{cls} samples with a flow-matching scheduler \(FlowMatchEuler"
                                         r"DiscreteScheduler\).*'DPM\+\+ 2M'.*Use sampler 'Euler'"):
        samplers.set_sampler(pipe, "dpm++ 2m karras")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert samplers.set_sampler(pipe, "euler") == "Euler"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == shift
    assert samplers.sampler_name(pipe) == "Euler"
    with pytest.raises(ValueError, match="Unknown sampler 'Eulr'. Did you mean 'Euler'"):
        samplers.set_sampler(pipe, "Eulr")


# --- A1111 1.9+: sampler x schedule type ---------------------------------------------------------------------------

A1111_SAMPLERS = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE",
                  "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM",
                  "DDIM CFG++", "PLMS", "UniPC", "LCM"]   # A1111 1.10's list, in its order
A1111_SCHEDULES = ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                   "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]


def test_every_a1111_sampler_and_schedule_type_is_offered_or_refused_naming_the_nearest():
    assert set(samplers.SAMPLERS) | set(samplers.REFUSED_SAMPLERS) == set(A1111_SAMPLERS)
    assert set(samplers.SCHEDULE_TYPES) | set(samplers.REFUSED_SCHEDULE_TYPES) >= set(A1111_SCHEDULES)
    for name, nearest in samplers.REFUSED_SAMPLERS.items():
        assert nearest in samplers.SAMPLERS
        with pytest.raises(ValueError, match=rf"{re.escape(repr(name))} has no diffusers equivalent: use "
                                             rf"{re.escape(repr(nearest))}"):
            samplers.parse(name)
    for name, nearest in samplers.REFUSED_SCHEDULE_TYPES.items():
        assert nearest in samplers.SCHEDULE_TYPES
        with pytest.raises(ValueError, match=rf"{re.escape(repr(name))} has no diffusers equivalent: use "
                                             rf"{re.escape(repr(nearest))}"):
            samplers.parse("Euler", name)


@pytest.mark.parametrize("sampler, resolved", [
    ("DPM++ 2M", "Karras"), ("DPM++ SDE", "Karras"), ("DPM2", "Karras"), ("DPM2 a", "Karras"),
    ("DPM++ 2M SDE", "Exponential"), ("DPM++ 2M SDE Heun", "Exponential"), ("DPM++ 3M SDE", "Exponential"),
    ("Euler a", "Automatic"), ("Euler", "Automatic"), ("LMS", "Automatic"), ("Heun", "Automatic"),
    ("DDIM", "Automatic"), ("PLMS", "Automatic"), ("UniPC", "Automatic"), ("LCM", "Automatic")])
def test_automatic_resolves_as_a1111_does(sampler, resolved):
    assert samplers.resolve(sampler, "Automatic") == resolved
    assert samplers.resolve(sampler, "Uniform") == "Uniform"


@pytest.mark.parametrize("typed, schedule, parsed", [
    ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")), ("DPM++ 2M", None, ("DPM++ 2M", "Automatic")),
    ("DPM++ 2M Karras", "Automatic", ("DPM++ 2M", "Karras")), ("DPM++ 2M Karras", "Exponential",
                                                                ("DPM++ 2M", "Exponential")),
    ("DPM++ 2M SDE Exponential", None, ("DPM++ 2M SDE", "Exponential")),
    ("DPM++ 3M SDE Karras", None, ("DPM++ 3M SDE", "Karras")), ("DPM2 a Karras", None, ("DPM2 a", "Karras")),
    ("DPM++ 2M SDE Heun Karras", None, ("DPM++ 2M SDE Heun", "Karras")), ("k_dpmpp_2m", None, ("DPM++ 2M", "Automatic")),
    ("k_euler_a", None, ("Euler a", "Automatic")), ("k_euler_ancestral", None, ("Euler a", "Automatic")),
    ("k_dpm_2_a_ka", None, ("DPM2 a", "Karras")), ("k_lms", "karras", ("LMS", "Karras")),
    ("dpmpp_2m_sde", "sgm_uniform", ("DPM++ 2M SDE", "SGM Uniform")), ("PNDM", None, ("PLMS", "Automatic")),
    ("uni_pc", None, ("UniPC", "Automatic")), (None, None, ("DPM++ 2M", "Automatic")), ("euler", "simple",
                                                                                          ("Euler", "Simple"))])
def test_old_names_and_aliases_parse_as_a1111_reads_them(typed, schedule, parsed):
    assert samplers.parse(typed, schedule) == parsed


def test_unknown_schedule_type_names_the_closest():
    with pytest.raises(ValueError, match=r"Unknown schedule type 'Karas'\. Did you mean 'Karras'\? Known schedule "
                                         r"types: Automatic, Uniform, Karras"):
        samplers.parse("Euler", "Karas")
    with pytest.raises(ValueError, match=r"`sampler` must be an A1111 sampler name"):
        samplers.parse("")


FLAGS = {"Karras": ("use_karras_sigmas", True), "Exponential": ("use_exponential_sigmas", True),
         "Beta": ("use_beta_sigmas", True), "Uniform": ("timestep_spacing", "linspace"),
         "Normal": ("timestep_spacing", "linspace"), "SGM Uniform": ("timestep_spacing", "trailing"),
         "Simple": ("timestep_spacing", "trailing"), "DDIM": ("timestep_spacing", "leading")}


def test_every_sampler_x_schedule_type_sets_its_flag_or_is_refused_naming_those_that_work(sd15):
    offered = 0
    for name in samplers.SAMPLERS:
        for schedule in samplers.SCHEDULE_TYPES:
            try:
                samplers.set_sampler(sd15, name, schedule)
            except ValueError as e:   # a scheduler without that flag: the ones it takes are named
                assert re.search(rf"{re.escape(repr(name))} cannot take the schedule type {re.escape(repr(schedule))}"
                                 r".* Use one of: Automatic", str(e)), str(e)
                continue
            offered += 1
            resolved = samplers.resolve(name, schedule)
            assert (samplers.sampler_name(sd15), samplers.schedule_type(sd15)) == (name, resolved)
            config = sd15.scheduler.config
            if resolved in FLAGS:
                key, value = FLAGS[resolved]
                assert config[key] == value, (name, schedule)
            others = [k for s, (k, v) in FLAGS.items() if v is True and s != resolved]
            assert not any(config.get(k) for k in others), (name, schedule)
    assert offered >= 110


def test_dpm_2m_karras_runs_karras_sigmas_and_differs_from_uniform(sd15):
    import diffusers

    samplers.set_sampler(sd15, "DPM++ 2M", "Karras")
    sd15.scheduler.set_timesteps(6)
    karras = sd15.scheduler.sigmas.numpy()
    reference = diffusers.DPMSolverMultistepScheduler.from_config(sd15.scheduler.config)
    reference.set_timesteps(6)
    np.testing.assert_allclose(karras, reference.sigmas.numpy())
    samplers.set_sampler(sd15, "DPM++ 2M", "Uniform")
    sd15.scheduler.set_timesteps(6)
    assert not np.allclose(sd15.scheduler.sigmas.numpy(), karras)
    rho = 7.0   # Karras et al.: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho
    lo, hi = karras[-2], karras[0]
    ramp = np.linspace(0, 1, 6)
    expected = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    np.testing.assert_allclose(karras[:-1], expected, rtol=1e-4)


def test_flow_matching_takes_euler_with_its_schedule_types():
    pipe = _pipe("flux-schnell")
    assert samplers.offered(pipe) == (["Euler"], list(samplers.FLOW_SCHEDULE_TYPES))
    samplers.set_sampler(pipe, "Euler", "Karras")
    assert pipe.scheduler.config.use_karras_sigmas is True and samplers.schedule_type(pipe) == "Karras"
    with pytest.raises(ValueError, match=r"'Euler' cannot take the schedule type 'SGM Uniform'.*Use one of: "
                                         r"Automatic, Karras, Exponential, Beta\."):
        samplers.set_sampler(pipe, "Euler", "SGM Uniform")


def test_import_does_not_load_torch_or_diffusers():
    code = "import sys, helpers.samplers; print([m for m in ('torch', 'diffusers') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
