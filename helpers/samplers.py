"""Samplers by their A1111/ComfyUI names: set_sampler(pipe, "DPM++ 2M Karras") swaps in the diffusers scheduler.

The table follows the "A1111/k-diffusion -> Diffusers" table of the diffusers scheduler docs. A new scheduler is always
built from the pipeline's ORIGINAL scheduler config (remembered on the pipe the first time), so the model's training
settings (betas, prediction_type, timestep_spacing, steps_offset ...) survive, and swapping back and forth never
accumulates flags: the sigma-schedule and solver flags below are dropped from that config and only the sampler's own
are applied.

Notes on fidelity (diffusers schedulers are close relatives of A1111's k-diffusion samplers, not bit-for-bit copies):
- "DPM++ SDE" / "DPM++ SDE Karras": DPMSolverSinglestepScheduler, as in the diffusers table. diffusers'
  literal k-diffusion port, DPMSolverSDEScheduler, needs torchsde and scipy, and draws its Brownian noise from a
  random seed of its own, not from the pipeline's `generator`, so the same seed would not give the same image.
- "LMS" / "LMS Karras": LMSDiscreteScheduler needs scipy (preinstalled on Colab): `pip install scipy` elsewhere.
- "UniPC" is diffusers' UniPCMultistepScheduler with its defaults; "PNDM" is diffusers' SD 1.5 default (~A1111 "PLMS").
- Flow-matching pipelines (SD3, FLUX) take none of these; only "Euler", which is their own
  FlowMatchEulerDiscreteScheduler.
torch and diffusers are imported inside the functions.
"""
import difflib
import importlib.util
import re

# name -> (diffusers scheduler class, config values the sampler needs on top of the model's own)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    # lower_order_final=True: what diffusers switches to anyway (with a warning) when the final sigma is zero
    "DPM++ SDE": ("DPMSolverSinglestepScheduler",
                  {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                          "lower_order_final": True, "use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
}

# Flags that pick a sampler rather than describe the model: dropped from the model's config before a sampler's own
# values are applied (absent, they take the scheduler's default: no Karras sigmas, etc.).
SAMPLER_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                 "algorithm_type", "solver_order", "solver_type", "lower_order_final")
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
NEEDS = {"LMSDiscreteScheduler": "scipy"}   # scheduler class -> the package it needs beyond diffusers
FLOW_EULER = "FlowMatchEulerDiscreteScheduler"


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", "", str(name).lower())


_BY_KEY = {_key(n): n for n in SAMPLERS}


def canonical(name: str) -> str:
    """The table's spelling of sampler `name` (case and spacing forgiven); ValueError listing the known ones."""
    if name in SAMPLERS:
        return name
    if _key(name) in _BY_KEY:
        return _BY_KEY[_key(name)]
    close = difflib.get_close_matches(_key(name), list(_BY_KEY), n=1, cutoff=0.6)
    hint = f" Did you mean {_BY_KEY[close[0]]!r}?" if close else ""
    raise ValueError(f"Unknown sampler {name!r}.{hint} Known samplers: {', '.join(SAMPLERS)}.")


def _base_config(pipe) -> dict:
    """The pipeline's original scheduler config, remembered on the pipe the first time we swap its scheduler."""
    base = getattr(pipe, "_helpers_base_scheduler_config", None)
    if base is None:
        base = dict(pipe.scheduler.config)
        base["_class_name"] = type(pipe.scheduler).__name__
        pipe._helpers_base_scheduler_config = base
    return base


def _is_flow(class_name: str) -> bool:
    return class_name.startswith("FlowMatch")


def set_sampler(pipe, name: str) -> str:
    """Give `pipe` the scheduler of the A1111/ComfyUI sampler `name` (case and spacing are forgiven: "dpm++ 2m
    karras"), keeping the model's own training config; returns the sampler's name as the table spells it."""
    import diffusers

    name = canonical(name)
    base = _base_config(pipe)
    if _is_flow(base["_class_name"]):
        if name != "Euler":
            raise ValueError(
                f"{type(pipe).__name__} samples with a flow-matching scheduler ({base['_class_name']}), which the "
                f"A1111 sampler {name!r} cannot replace: these samplers are for noise-predicting models (SD 1.x, "
                "SDXL). Use sampler 'Euler', the pipeline's own.")
        pipe.scheduler = getattr(diffusers, base["_class_name"]).from_config(base)
        return name
    class_name, flags = SAMPLERS[name]
    package = NEEDS.get(class_name)
    if package and importlib.util.find_spec(package) is None:
        raise ImportError(f"The sampler {name!r} ({class_name}) needs {package}, which is not installed: "
                          f"pip install {package}")
    config = {k: v for k, v in base.items() if k not in SAMPLER_FLAGS}
    pipe.scheduler = getattr(diffusers, class_name).from_config(config, **flags)
    return name


def _matches(config, flags: dict) -> bool:
    expected = {flag: False for flag in _SIGMA_FLAGS} | flags
    return all(config.get(k, False if k in _SIGMA_FLAGS else None) == v for k, v in expected.items())


def sampler_name(pipe) -> str:
    """The A1111 name of `pipe`'s current scheduler (for a PNG's "Sampler:" field), else the scheduler's class name."""
    class_name = type(pipe.scheduler).__name__
    if class_name == FLOW_EULER:
        return "Euler"
    for name, (cls, flags) in SAMPLERS.items():
        if cls == class_name and _matches(pipe.scheduler.config, flags):
            return name
    return class_name
