"""The typed training config: "False" is false, "16" is 16, "None" is none, and every other value of the wrong type or
out of range is one ValueError line naming the field, before anything loads (issue 17, item 5)."""
import codecs
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.training import config as training_config
from helpers.training.config import TrainConfig, make_config


@pytest.fixture
def base(tmp_path):
    return {"dataset": str(tmp_path / "data"), "run_dir": str(tmp_path / "run")}


@pytest.mark.parametrize("text, value", [("False", False), ("false", False), ("no", False), ("0", False),
                                         ("True", True), ("yes", True), (" true ", True), (1, True), (0, False)])
def test_switches_typed_as_text_mean_what_they_say(base, text, value):
    config = make_config({**base, "use_dora": text, "cache_latents": text, "train_text_encoder": text})
    assert config.use_dora is value and config.cache_latents is value and config.train_text_encoder is value


def test_numbers_and_none_typed_as_text(base):
    config = make_config({**base, "rank": "16", "alpha": "8", "learning_rate": "1e-4", "max_train_steps": 500.0,
                          "trigger": "None", "text_encoder_lr": "null", "class_prompt": "  ",
                          "sample_prompts": "a cat", "lr_scheduler": "Cosine"})
    assert (config.rank, config.alpha, config.learning_rate, config.max_train_steps) == (16, 8.0, 1e-4, 500)
    assert isinstance(config.rank, int) and isinstance(config.alpha, float)
    assert config.trigger is None and config.text_encoder_lr is None and config.class_prompt is None
    assert config.sample_prompts == ["a cat"] and config.lr_scheduler == "cosine"
    assert make_config({**base, "trigger": 1990}).trigger == "1990"   # a number in JSON is the word it spells


def test_set_false_from_the_command_line_trains_no_dora(base):
    overrides = training_config.parse_overrides(["use_dora=False", "cache_latents=False", "train_text_encoder=False",
                                                 "trigger=None"])
    config = make_config({**base, **overrides})
    assert (config.use_dora, config.cache_latents, config.train_text_encoder, config.trigger) == (False, False, False,
                                                                                                 None)


@pytest.mark.parametrize("values, message", [
    ({"use_dora": "maybe"}, "`use_dora` must be true or false, not 'maybe'"),
    ({"rank": "1.5"}, "`rank` must be a whole number, not '1.5'"),
    ({"rank": True}, "`rank` must be a whole number, not True"),
    ({"learning_rate": "fast"}, "`learning_rate` must be a number, not 'fast'"),
    ({"learning_rate": float("nan")}, "`learning_rate` must be a number, not nan"),
    ({"max_grad_norm": -1}, "`max_grad_norm` must be above 0, not -1.0"),
    ({"alpha": 0}, "`alpha` must be above 0"),
    ({"lr_warmup_steps": -10}, "`lr_warmup_steps` must be 0 or more, not -10"),
    ({"min_snr_gamma": -5}, "`min_snr_gamma` must be 0 or more"),
    ({"noise_offset": 100}, "`noise_offset` must be from 0 to 1, not 100.0"),
    ({"resolution": 0}, "`resolution` must be from 64 to 2048, not 0"),
    ({"resolution": -512}, "`resolution` must be from 64 to 2048, not -512"),
    ({"seed": -1}, "`seed` must be 0 or more"),
    ({"lr_scheduler": "warmup"}, "`lr_scheduler` must be one of linear, cosine"),
    ({"sample_prompts": [1, 2]}, "`sample_prompts` must be a list of prompts"),
    ({"trigger": "sks\ndog"}, "`trigger` must be one line"),
    ({"run_dir": "  "}, "`run_dir` must be a path"),
    ({"dataset": ""}, "`dataset` must be a path"),
])
def test_wrong_values_name_the_field_and_the_value(base, values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        make_config({**base, **values})


def test_an_empty_run_name_does_not_make_the_runs_folder_the_run(base, tmp_path, monkeypatch):
    from helpers import storage

    monkeypatch.setenv(storage.ENV_HOME, str(tmp_path / "home"))
    runs = storage.project_paths().runs
    with pytest.raises(ValueError, match="`run_dir` is .* the project's runs/ folder itself"):
        make_config({**base, "run_dir": str(runs / "")})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="the current folder"):
        make_config({**base, "run_dir": "."})


def test_the_schedulers_are_diffusers_own():
    from diffusers.optimization import SchedulerType

    assert set(training_config.LR_SCHEDULERS) == {s.value for s in SchedulerType}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_config_files_in_utf8_with_a_bom_or_utf16_are_read(base, tmp_path):
    text = json.dumps({**base, "rank": 8})
    for name, data in [("bom.json", codecs.BOM_UTF8 + text.encode()), ("utf16.json", text.encode("utf-16")),
                       ("utf16be.json", codecs.BOM_UTF16_BE + text.encode("utf-16-be"))]:
        assert training_config.read_config(_write(tmp_path / name, data)).rank == 8


def test_an_image_or_a_binary_file_is_not_a_json_config(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    with pytest.raises(ValueError, match="Not a JSON config: .*cat.png"):
        training_config.read_config(tmp_path / "cat.png")
    with pytest.raises(ValueError, match="Not a JSON config: .*bad.json.* not valid JSON"):
        training_config.read_config(_write(tmp_path / "bad.json", b"{rank: 8"))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                           | st.text(max_size=12) | st.sampled_from(["true", "False", "no", "None", "null", "16",
                                                                     "1e-4", "-1", "cosine", "lora", "full"]),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=2), max_leaves=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from([f for f in training_config.field_names() if f not in ("dataset", "run_dir")]),
       value=json_values)
def test_any_json_value_for_any_field_is_a_config_or_one_line_naming_the_field(base, name, value):
    try:
        config = make_config({**base, name: value})
    except ValueError as e:
        message = str(e)
        assert "\n" not in message and f"`{name}`" in message, message
    else:
        assert isinstance(config, TrainConfig)
        again = make_config(training_config.to_dict(config))   # what it became is itself a valid config
        assert again == config
