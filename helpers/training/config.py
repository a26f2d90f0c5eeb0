"""A training run's settings as a JSON file, so that a run can be repeated or resumed from a shell.

The notebook writes `config.json` into the run folder; `python -m helpers train-lora CONFIG.json [--set KEY=VALUE]`
reads it back. The keys are the fields of `loop.TrainConfig`, read from the dataclass itself, so a field added there
is valid here at once. Relative `dataset` and `run_dir` paths in a file are relative to the file's own folder.
"""
import dataclasses
import json
import types
import typing
from pathlib import Path

from .. import storage
from .loop import TrainConfig

CONFIG_NAME = "config.json"
_PATH_FIELDS = ("dataset", "run_dir")


def field_names() -> list[str]:
    """The keys a config may hold: TrainConfig's fields, in their order."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def check_keys(keys) -> None:
    """Raise ValueError naming any key that is not a TrainConfig field, with the list of valid ones."""
    valid = field_names()
    unknown = [k for k in keys if k not in valid]
    if unknown:
        raise ValueError(f"Unknown TrainConfig field(s): {', '.join(map(repr, unknown))}. Valid fields: "
                         f"{', '.join(valid)}.")


def _is_text_field(name: str) -> bool:
    """Whether the field `name` is annotated str (or str | None)."""
    kind = typing.get_type_hints(TrainConfig).get(name)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args == [str]
    return kind is str


def parse_value(name: str, text: str):
    """The value of `--set name=text`: JSON where it parses (2, 1e-4, true, null, {"a": 1}), else the text itself.
    A text field keeps the text as written (`trigger=1990s`, `trigger=42`), except `null`."""
    if _is_text_field(name) and text != "null":
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(pairs) -> dict:
    """["KEY=VALUE", ...] -> {key: value}; the keys are checked against TrainConfig's fields."""
    overrides = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, e.g. --set max_train_steps=500, not {pair!r}.")
        overrides[key.strip()] = text
    check_keys(overrides)
    return {key: parse_value(key, text) for key, text in overrides.items()}


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def write_config(config: TrainConfig, path) -> Path:
    """Write `config` as JSON to `path` (a file, or a folder to hold `config.json`), atomically. Returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    return storage.atomic_write(path, json.dumps(to_dict(config), indent=2) + "\n")


def make_config(values: dict) -> TrainConfig:
    """A TrainConfig from a dict of its fields; unknown keys and missing required ones are named in the error."""
    check_keys(values)
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"The config lacks {', '.join(missing)}: add them to the file, or pass "
                         f"{' '.join(f'--set {m}=...' for m in missing)}.")
    try:
        return TrainConfig(**values)
    except TypeError as e:  # a value of the wrong type that __post_init__ compares, e.g. "rank": "16"
        raise ValueError(f"The config does not make a TrainConfig: {e}.") from e


def read_config(path, overrides: dict | None = None) -> TrainConfig:
    """The TrainConfig in the JSON file `path` (a file, or a run folder holding `config.json`), with `overrides`
    (already parsed values) on top. Unknown keys raise ValueError with the list of valid fields. Relative `dataset`
    and `run_dir` paths in the file are relative to the file's folder; in `overrides` they are used as given."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No training config at {str(path)!r}: pass the config.json that the notebook "
                                "wrote into the run folder (runs/<RUN_NAME>/config.json).")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}): fix the file, or write it again with "
                         "write_config().") from e
    if not isinstance(values, dict):  # a ValueError, as bad input is: the CLI reports it in one line
        raise ValueError(f"{str(path)!r} must hold a JSON object of TrainConfig fields, not a "  # noqa: TRY004
                         f"{type(values).__name__}.")
    check_keys(values)
    for name in _PATH_FIELDS:
        if isinstance(values.get(name), str):
            given = Path(values[name]).expanduser()
            values[name] = str(given if given.is_absolute() else path.parent / given)
    overrides = dict(overrides or {})
    check_keys(overrides)
    return make_config({**values, **overrides})
