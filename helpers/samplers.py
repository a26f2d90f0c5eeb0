"""Samplers and schedule types the A1111 1.9+ way: set_sampler(pipe, "DPM++ 2M", "Karras") swaps in the diffusers
scheduler.

A1111 1.9+ names a sampler ("DPM++ 2M") and a schedule type ("Karras") apart; its "Automatic" schedule is the
sampler's own default (AUTOMATIC: Karras for DPM++ 2M, Exponential for DPM++ 2M SDE, ...; the model's own
discretisation for the others). The old combined names ("DPM++ 2M Karras", "DPM++ 2M SDE Exponential") and A1111's
aliases ("k_dpmpp_2m", "k_euler_a", "k_dpm_2_a_ka") still work. The sampler table follows the "A1111/k-diffusion ->
Diffusers" table of the diffusers scheduler docs. A new scheduler is always built from the pipeline's ORIGINAL
scheduler config (remembered on the pipe the first time), so the model's training settings (betas, prediction_type,
timestep_spacing, steps_offset ...) survive, and swapping back and forth never accumulates flags.

Schedule types as diffusers expresses them: Karras, Exponential, Beta (sigma flags); Uniform and Normal (timesteps
evenly spaced from the last: "linspace"), SGM Uniform and Simple ("trailing"), DDIM ("leading", offset 1). A schedule
a scheduler cannot take (Karras for Euler a, whose diffusers scheduler has no such flag) is refused, naming those it
takes. A1111's other schedule types and samplers are refused naming the nearest one that exists here.

Notes on fidelity (diffusers schedulers are close relatives of A1111's k-diffusion samplers, not bit-for-bit copies):
- "DPM++ SDE": DPMSolverSinglestepScheduler, as in the diffusers table. diffusers' literal k-diffusion port,
  DPMSolverSDEScheduler, needs torchsde and draws its Brownian noise from a random seed of its own, not from the
  pipeline's `generator`, so the same seed would not give the same image.
- "LMS" and the "Beta" schedule need scipy (preinstalled on Colab): `pip install scipy` elsewhere.
- "PLMS" is diffusers' PNDMScheduler with skip_prk_steps (diffusers' SD 1.5 default); "PNDM" is read as PLMS.
- Flow-matching pipelines (SD3, FLUX) take only "Euler", their own FlowMatchEulerDiscreteScheduler, with the
  schedule types it has (FLOW_SCHEDULE_TYPES).
torch and diffusers are imported inside the functions.
"""
import difflib
import importlib.util
import re

# A1111 1.10 name -> (diffusers scheduler class, config values the sampler needs on top of the model's own)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # lower_order_final=True: what diffusers switches to anyway (with a warning) when the final sigma is zero
    "DPM++ SDE": ("DPMSolverSinglestepScheduler",
                  {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE Heun": ("DPMSolverMultistepScheduler",
                          {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"}),
    "DPM++ 3M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}
# What A1111 1.10's "Automatic" schedule type means for each sampler (its sampler table's `scheduler` option);
# a sampler not named here samples with the model's own discretisation.
AUTOMATIC = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM2": "Karras", "DPM2 a": "Karras",
             "DPM++ 2M SDE": "Exponential", "DPM++ 2M SDE Heun": "Exponential", "DPM++ 3M SDE": "Exponential"}
# A1111 1.10 schedule type -> the scheduler config values that express it in diffusers ("Automatic": see AUTOMATIC)
SCHEDULE_TYPES: dict[str, dict] = {
    "Automatic": {},
    "Uniform": {"timestep_spacing": "linspace"},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
    "Simple": {"timestep_spacing": "trailing"},
    "Normal": {"timestep_spacing": "linspace"},
    "DDIM": {"timestep_spacing": "leading", "steps_offset": 1},
    "Beta": {"use_beta_sigmas": True},
}
# A1111 names with no diffusers equivalent -> the nearest that exists here
REFUSED_SAMPLERS = {"DPM++ 2S a": "DPM2 a", "DPM fast": "DPM++ 2M", "DPM adaptive": "DPM++ 2M", "Restart": "Heun",
                    "DDIM CFG++": "DDIM"}
REFUSED_SCHEDULE_TYPES = {"Polyexponential": "Exponential", "KL Optimal": "Karras", "Align Your Steps": "Karras",
                          "Align Your Steps GITS": "Karras", "Align Your Steps 11": "Karras",
                          "Align Your Steps 32": "Karras", "Turbo": "SGM Uniform"}
# A1111's aliases (and ComfyUI's names, which are the same without "k_"); "_ka" is A1111's old "Karras" suffix
ALIASES = {"dpmpp_2m": "DPM++ 2M", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE",
           "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_3m_sde": "DPM++ 3M SDE", "dpmpp_2s_a": "DPM++ 2S a",
           "dpmpp_2s_ancestral": "DPM++ 2S a", "euler_a": "Euler a", "euler_ancestral": "Euler a", "euler": "Euler",
           "lms": "LMS", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_a": "DPM2 a", "dpm_2_ancestral": "DPM2 a",
           "dpm_fast": "DPM fast", "dpm_ad": "DPM adaptive", "dpm_adaptive": "DPM adaptive", "restart": "Restart",
           "ddim": "DDIM", "ddim_cfgpp": "DDIM CFG++", "plms": "PLMS", "pndm": "PLMS", "unipc": "UniPC",
           "uni_pc": "UniPC", "lcm": "LCM"}
DEFAULT_SAMPLER = "DPM++ 2M"      # A1111's default, with the "Automatic" schedule (so Karras)
DEFAULT_SCHEDULE_TYPE = "Automatic"
FLOW_SAMPLERS = ("Euler",)
# flow matching: "Automatic" and "Simple" are the model's own shifted schedule; the sigma flags FlowMatchEuler has
FLOW_SCHEDULE_TYPES = ("Automatic", "Simple", "Karras", "Exponential", "Beta")

# Flags that pick a sampler or a schedule rather than describe the model: dropped from the model's config before a
# sampler's own values are applied (absent, they take the scheduler's default: no Karras sigmas, etc.).
SAMPLER_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                 "algorithm_type", "solver_order", "solver_type", "lower_order_final", "skip_prk_steps")
_SIGMA_FLAGS = {"use_karras_sigmas": "Karras", "use_exponential_sigmas": "Exponential", "use_beta_sigmas": "Beta"}
NEEDS = {"LMSDiscreteScheduler": "scipy", "Beta": "scipy"}   # scheduler class or schedule -> the package it needs
FLOW_EULER = "FlowMatchEulerDiscreteScheduler"


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", "", str(name).lower())


_SAMPLER_KEYS = {_key(n): n for n in [*SAMPLERS, *REFUSED_SAMPLERS]} | {_key(a): n for a, n in ALIASES.items()}
_SCHEDULE_KEYS = {_key(n): n for n in [*SCHEDULE_TYPES, *REFUSED_SCHEDULE_TYPES]}


def _refuse_sampler(name: str) -> ValueError:
    nearest = REFUSED_SAMPLERS[name]
    return ValueError(f"The A1111 sampler {name!r} has no diffusers equivalent: use {nearest!r}, the nearest one "
                      f"here (samplers: {', '.join(SAMPLERS)}).")


def _unknown(kind: str, name, known, keys: dict) -> ValueError:
    close = difflib.get_close_matches(_key(name), list(keys), n=1, cutoff=0.6)
    hint = f" Did you mean {keys[close[0]]!r}?" if close else ""
    return ValueError(f"Unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known)}.")


def _split(name) -> tuple[str, str | None]:
    """(sampler, schedule type or None) from a sampler name, old combined names and aliases included; refused
    names raise ValueError naming the nearest; unknown ones the closest known."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"`sampler` must be an A1111 sampler name such as {DEFAULT_SAMPLER!r}, not {name!r}.")
    key = _key(re.sub(r"^k_", "", name.strip().lower()))
    schedule = None
    if key not in _SAMPLER_KEYS:
        if key.endswith("ka") and key[:-2] in _SAMPLER_KEYS:       # k_dpmpp_2m_ka: A1111's old Karras alias
            key, schedule = key[:-2], "Karras"
        else:
            for suffix, schedule_name in sorted(_SCHEDULE_KEYS.items(), key=lambda kv: -len(kv[0])):
                if key.endswith(suffix) and key[:-len(suffix)] in _SAMPLER_KEYS:
                    key, schedule = key[:-len(suffix)], schedule_name
                    break
    if key not in _SAMPLER_KEYS:
        raise _unknown("sampler", name, SAMPLERS, {_key(n): n for n in SAMPLERS})
    sampler = _SAMPLER_KEYS[key]
    if sampler in REFUSED_SAMPLERS:
        raise _refuse_sampler(sampler)
    return sampler, schedule


def canonical(name: str) -> str:
    """The table's spelling of sampler `name` (case, spacing, aliases and old "... Karras" names forgiven: the
    sampler part); ValueError naming the nearest known one."""
    return _split(name)[0]


def canonical_schedule(name: str) -> str:
    """The A1111 spelling of schedule type `name` (case and spacing forgiven); ValueError naming the nearest."""
    if not isinstance(name, str) or _key(name) not in _SCHEDULE_KEYS:
        raise _unknown("schedule type", name, SCHEDULE_TYPES, {_key(n): n for n in SCHEDULE_TYPES})
    schedule = _SCHEDULE_KEYS[_key(name)]
    if schedule in REFUSED_SCHEDULE_TYPES:
        raise ValueError(f"The A1111 schedule type {schedule!r} has no diffusers equivalent: use "
                         f"{REFUSED_SCHEDULE_TYPES[schedule]!r}, the nearest one here (schedule types: "
                         f"{', '.join(SCHEDULE_TYPES)}).")
    return schedule


def parse(sampler: str | None = None, schedule_type: str | None = None) -> tuple[str, str]:
    """(sampler, schedule type) as A1111 1.9+ reads them: a combined old name gives its schedule where
    `schedule_type` is None or "Automatic" ("DPM++ 2M Karras" -> ("DPM++ 2M", "Karras")); no sampler is A1111's
    default, DPM++ 2M. The schedule type is not resolved (see resolve)."""
    name, suffix = _split(sampler if sampler is not None else DEFAULT_SAMPLER)
    schedule = canonical_schedule(schedule_type) if schedule_type is not None else "Automatic"
    if suffix and schedule == "Automatic":
        schedule = suffix
    return name, schedule


def resolve(sampler: str, schedule_type: str = "Automatic") -> str:
    """The schedule type A1111 samples `sampler` with: "Automatic" becomes the sampler's own (AUTOMATIC), or stays
    "Automatic" (the model's own discretisation)."""
    return AUTOMATIC.get(sampler, "Automatic") if schedule_type == "Automatic" else schedule_type


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


def is_flow(pipe) -> bool:
    """Whether `pipe` samples with a flow-matching scheduler (SD3, FLUX): only FLOW_SAMPLERS apply."""
    return _is_flow(_base_config(pipe)["_class_name"])


def _accepted(scheduler_class) -> set:
    import inspect

    return set(inspect.signature(scheduler_class.__init__).parameters)


def _schedule_values(sampler: str, schedule: str, scheduler_class, flow: bool) -> dict:
    """The config values of `schedule` for this scheduler class; ValueError naming those it can take."""
    values = {} if flow and schedule in ("Automatic", "Simple") else SCHEDULE_TYPES[schedule]
    accepted = _accepted(scheduler_class)
    if all(k in accepted for k in values):
        return values
    offered = [s for s, v in SCHEDULE_TYPES.items() if all(k in accepted for k in v)
               and (not flow or s in FLOW_SCHEDULE_TYPES)]
    raise ValueError(f"The sampler {sampler!r} cannot take the schedule type {schedule!r} here: diffusers' "
                     f"{scheduler_class.__name__} has no {' / '.join(values)}. Use one of: {', '.join(offered)}"
                     + (" (or 'Euler' with Karras)." if not flow and "use_karras_sigmas" in values else "."))


def _check_package(what: str, key: str) -> None:
    package = NEEDS.get(key)
    if package and importlib.util.find_spec(package) is None:
        raise ImportError(f"{what} needs {package}, which is not installed: pip install {package}")


def set_sampler(pipe, name: str | None = None, schedule_type: str | None = None) -> str:
    """Give `pipe` the scheduler of the A1111 sampler `name` with the A1111 `schedule_type` (default: "Automatic",
    or the schedule an old combined name carries, "DPM++ 2M Karras"), keeping the model's own training config;
    returns the sampler's name as the table spells it (the schedule it runs: `schedule_type(pipe)`)."""
    import diffusers

    name, schedule = parse(name, schedule_type)
    schedule = resolve(name, schedule)
    base = _base_config(pipe)
    flow = _is_flow(base["_class_name"])
    if flow:
        if name not in FLOW_SAMPLERS:
            raise ValueError(
                f"{type(pipe).__name__} samples with a flow-matching scheduler ({base['_class_name']}), which the "
                f"A1111 sampler {name!r} cannot replace: these samplers are for noise-predicting models (SD 1.x, "
                f"SDXL). Use sampler {' or '.join(map(repr, FLOW_SAMPLERS))}, the pipeline's own.")
        class_name, flags = base["_class_name"], {}
    else:
        class_name, flags = SAMPLERS[name]
    scheduler_class = getattr(diffusers, class_name)
    _check_package(f"The sampler {name!r} ({class_name})", class_name)
    _check_package(f"The schedule type {schedule!r}", schedule)
    values = _schedule_values(name, schedule, scheduler_class, flow)
    config = {k: v for k, v in base.items() if k not in SAMPLER_FLAGS}
    pipe.scheduler = scheduler_class.from_config(config, **flags, **values)
    pipe.scheduler._helpers_a1111 = (name, schedule)   # what A1111 would write; read by sampler_name/schedule_type
    return name


def _matches(config, flags: dict) -> bool:
    return all(config.get(k) == v for k, v in flags.items())


def _recorded(pipe):
    return getattr(pipe.scheduler, "_helpers_a1111", None)


def sampler_name(pipe) -> str:
    """The A1111 name of `pipe`'s current scheduler (for a PNG's "Sampler:" field), else the scheduler's class name.
    diffusers' PNDM default is A1111's "PLMS"."""
    if _recorded(pipe):
        return _recorded(pipe)[0]
    class_name = type(pipe.scheduler).__name__
    if class_name == FLOW_EULER:
        return "Euler"
    if class_name == "PNDMScheduler":
        return "PLMS"
    for name, (cls, flags) in SAMPLERS.items():
        if cls == class_name and _matches(pipe.scheduler.config, flags):
            return name
    return class_name


def schedule_type(pipe) -> str:
    """The A1111 schedule type `pipe`'s current scheduler runs (for a PNG's "Schedule type:" field): what
    set_sampler set, else read from the sigma flags ("Karras", ...), else "Automatic" (the model's own)."""
    if _recorded(pipe):
        return _recorded(pipe)[1]
    config = pipe.scheduler.config
    return next((s for flag, s in _SIGMA_FLAGS.items() if config.get(flag)), "Automatic")


def offered(pipe=None) -> tuple[list[str], list[str]]:
    """The sampler and schedule type names offered (for dropdowns): for a flow-matching `pipe` only those that apply."""
    if pipe is not None and is_flow(pipe):
        return list(FLOW_SAMPLERS), list(FLOW_SCHEDULE_TYPES)
    return list(SAMPLERS), list(SCHEDULE_TYPES)
