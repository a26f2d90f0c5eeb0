"""The CLI's failures: every known error is one `error:` line (no traceback), Ctrl-C stops cleanly, bad input is refused
before the first model loads, check-dataset, LoRA stacking names, and unusable HELPERS_HOME / HELPERS_CACHE."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import draw_dataset
from test_cli import _training_config   # the same tiny run as test_cli's
from helpers import cli, doctor, lora, prompts


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test loudly (an AssertionError is not a known error: main lets it through)."""
    from helpers import loading

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(loading, "load_sd", loaded)
    monkeypatch.setattr(loading, "load_llava", loaded)


def one_error_line(capsys, code, expected_code=2) -> str:
    assert code == expected_code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def argparse_refusal(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A real read-only file system at `path` (a 1 MiB tmpfs; CI runs as root, where chmod does not stop writes)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


# --- known errors: one line; unknown ones: the traceback -------------------------------------------------------------

@pytest.mark.parametrize("error", [OSError("Could not load 'x': no network."),
                                   FileNotFoundError("No image at 'x.png'."),
                                   ValueError("`steps` must be positive."),
                                   __import__("helpers.planner").planner.PlanUnavailable("cannot plan 'a/b' offline"),
                                   __import__("helpers.one_file").one_file.CheckpointFileError("not a LoRA")])
def test_known_errors_are_one_line(error, monkeypatch, capsys):
    def fails(args):
        raise error

    monkeypatch.setattr(cli, "plan", fails)
    line = one_error_line(capsys, cli.main(["plan", "sd15"]))
    assert line == f"error: {error}"


def test_a_bug_keeps_its_traceback(monkeypatch):
    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "plan", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["plan", "sd15"])


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_of_known_errors(how, monkeypatch):
    def fails(args):
        raise ValueError("bad value")

    monkeypatch.setattr(cli, "plan", fails)
    if how == "env":
        monkeypatch.setenv("HELPERS_DEBUG", "1")
    with pytest.raises(ValueError, match="bad value"):
        cli.main((["--debug"] if how == "flag" else []) + ["plan", "sd15"])


def test_a_model_that_cannot_be_loaded_offline_is_one_line(tmp_path, monkeypatch, capsys):
    # the real loading path, not SMOKE MODE: offline, a hub id that is not cached is loading's "Could not load" OSError
    monkeypatch.setenv("HELPERS_TINY", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_error_line(capsys, cli.main(["generate", "a cat", "--model", "nobody/nothing", "--steps", "1",
                                            "--out", str(tmp_path)]))
    assert line.startswith("error: Could not load 'nobody/nothing'") and "HELPERS_TINY=1" in line
    assert not any(tmp_path.iterdir())


# --- Ctrl-C ----------------------------------------------------------------------------------------------------------

def test_ctrl_c_stops_without_a_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "plan", interrupted)
    assert cli.main(["plan", "sd15"]) == 130
    assert capsys.readouterr().err == "stopped\n"


def test_ctrl_c_in_training_says_how_to_resume(monkeypatch, capsys, tmp_path):
    from helpers.training import loop

    def interrupted(config, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_lora", interrupted)
    config = _training_config(tmp_path)
    assert cli.main(["train-lora", str(config), "--no-progress"]) == 130
    assert capsys.readouterr().err.endswith("stopped; run the same command again to resume\n")


def test_a_real_sigint_during_training(tmp_path):
    config = _training_config(tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "helpers", "train-lora", str(config), "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "HELPERS_TINY": "1"})
    try:
        assert process.stdout.readline().startswith("run folder:")  # main is running: the signal lands in it
        while not list((tmp_path / "run").glob("checkpoint-*")):  # training is under way (it takes 1000 steps)
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "stopped; run the same command again to resume"


# --- check-dataset ---------------------------------------------------------------------------------------------------

def test_check_dataset_command(tmp_path, capsys):
    root = draw_dataset(tmp_path / "data" / "5_sks", [(64, 64), (80, 64)], captions=["a", "b"])
    assert cli.main(["check-dataset", str(root), "--resolution", "64"]) == 0
    out = capsys.readouterr().out
    assert "2 image(s), 2 readable, 2 captioned: ready to train." in out
    (root / "5_sks" / "broken.png").write_bytes(b"not a png")
    assert cli.main(["check-dataset", str(root), "--resolution", "64"]) == 1
    out = capsys.readouterr().out
    assert "NOT READY" in out and "broken.png" in out
    assert cli.main(["check-dataset", str(root), "--resolution", "512"]) == 1  # 64 px < 256: too small
    assert "too small for resolution 512" in capsys.readouterr().out


def test_check_dataset_bad_folders_are_one_line(tmp_path, capsys):
    assert "`dataset` must be a path" in one_error_line(capsys, cli.main(["check-dataset", " "]))
    one_error_line(capsys, cli.main(["check-dataset", str(tmp_path / "missing")]))
    assert "--resolution" in argparse_refusal(capsys, ["check-dataset", str(tmp_path), "--resolution", "0"])


# --- checked before the first model loads ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["bench", "--steps", "0"], "--steps"),
    (["bench", "--size", "0"], "--size"),
    (["bench", "--size", "-64"], "--size"),
    (["bench", "--warmup", "-1"], "--warmup"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--steps", "-5"], "--steps"),
    (["plan", "sd15", "--resolution", "-512"], "--resolution"),
    (["plan", "sd15", "--batch", "0"], "--batch"),
    (["generate", "a cat", "--clip-skip", "0"], "--clip-skip"),
    (["generate", "a cat", "--clip-skip", "13"], "--clip-skip"),
    (["generate", "a cat", "--hires-scale", "0.5"], "--hires-scale"),
    (["generate", "a cat", "--hires-scale", "5"], "--hires-scale"),
    (["generate", "a cat", "--lora", "x.safetensors:abc:name"], None),
])
def test_bad_numbers_are_refused_by_the_parser(argv, message, capsys, no_loading):
    if message is None:  # a scale that is no number is part of the path: no such LoRA
        assert "No LoRA at 'x.safetensors:abc:name'" in one_error_line(capsys, cli.main(argv))
        return
    line = argparse_refusal(capsys, argv)
    assert "error: argument " + message in line and argv[-1] in line


def test_bench_checks_its_reference_before_any_model_runs(tmp_path, capsys, no_loading):
    line = one_error_line(capsys, cli.main(["bench", "--models", "sd15", "--reference", str(tmp_path / "missing"),
                                            "--out", str(tmp_path / "out")]))
    assert "--reference" in line and "missing" in line
    (tmp_path / "one.png").write_bytes(b"")
    line = one_error_line(capsys, cli.main(["bench", "--models", "sd15", "--reference", str(tmp_path / "one.png"),
                                            "--out", str(tmp_path / "out")]))
    assert "--reference" in line and "folder" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error_line(capsys, cli.main(["bench", "--models", "sd15", "--reference", str(empty),
                                            "--out", str(tmp_path / "out")]))
    assert "--reference" in line and "2" in line  # FID and KID need at least two reference images
    assert not (tmp_path / "out").exists()


def test_run_benchmark_checks_its_settings_before_loading(no_loading):
    from helpers import bench

    for setting, name in (({"num_inference_steps": 0}, "num_inference_steps"), ({"size": 0}, "size"),
                          ({"size": 100}, "size"), ({"guidance_scale": -1}, "guidance_scale")):
        with pytest.raises(ValueError, match=name):
            bench.run_benchmark(["sd15"], prompts=["a cat"], settings=[setting], quality=False)
    with pytest.raises(FileNotFoundError, match="reference"):
        bench.run_benchmark(["sd15"], prompts=["a cat"], reference="/no/such/folder")


def _picture(path: Path, size=(64, 64)) -> Path:
    Image.new("RGB", size, (200, 100, 50)).save(path)
    return path


def test_inpaint_checks_image_and_mask_before_loading(tmp_path, capsys, no_loading):
    photo = _picture(tmp_path / "photo.png")
    out = ["--out", str(tmp_path / "out")]
    line = one_error_line(capsys, cli.main(["inpaint", str(photo), str(tmp_path / "nomask.png"), "a car", *out]))
    assert "No mask at" in line
    (tmp_path / "junk.png").write_bytes(b"junk")
    line = one_error_line(capsys, cli.main(["inpaint", str(photo), str(tmp_path / "junk.png"), "a car", *out]))
    assert "junk.png" in line
    line = one_error_line(capsys, cli.main(["inpaint", str(tmp_path / "nophoto.png"), str(photo), "a car", *out]))
    assert "No image at" in line
    assert not (tmp_path / "out").exists()


def test_inpaint_with_a_mask_of_another_size_runs(tmp_path, capsys):
    photo = _picture(tmp_path / "photo.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(tmp_path / "mask.png")
    code = cli.main(["inpaint", str(photo), str(tmp_path / "mask.png"), "a car", "--steps", "2", "--seed", "1",
                     "--out", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    assert "resized" in out.lower()  # masks.load_mask's notice
    with Image.open(out.split()[-1]) as im:
        assert im.size == (64, 64)


def test_generate_checks_each_lora_before_loading(tmp_path, capsys, no_loading):
    import torch
    from safetensors.torch import save_file

    out = ["--out", str(tmp_path / "out")]
    line = one_error_line(capsys, cli.main(["generate", "a cat", "--lora", str(tmp_path / "gone.safetensors"), *out]))
    assert "No LoRA at" in line and "gone.safetensors" in line
    save_file({"emb_params": torch.zeros(2, 32)}, tmp_path / "embedding.safetensors")
    line = one_error_line(capsys, cli.main(["generate", "a cat", "--lora",
                                            f"{tmp_path / 'embedding.safetensors'}:0.5", *out]))
    assert "textual-inversion embedding, not a LoRA" in line
    line = one_error_line(capsys, cli.main(["generate", "a cat", "--lora", f"{tmp_path / 'gone.safetensors'}:9", *out]))
    assert "scale" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("prompt", ["\0", "\u200b", " \u200c\u200d ", "\ufeff\u2060", "\0\u200b\n"])
def test_a_prompt_of_invisible_characters_is_empty(prompt, capsys, no_loading, tmp_path):
    assert prompts.is_blank(prompt) and not prompts.is_blank("a\u200bcat")
    empty = one_error_line(capsys, cli.main(["generate", "", "--out", str(tmp_path)]))
    assert one_error_line(capsys, cli.main(["generate", prompt, "--out", str(tmp_path)])) == \
        empty.replace("''", repr(prompt))
    with pytest.raises(ValueError, match="`prompt` must be a non-empty string"):
        prompts.check_prompt(prompt)
    line = one_error_line(capsys, cli.main(["chat", "x.png", prompt]))
    assert "The question must be a non-empty string" in line


# --- LoRA stacking ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [
    ("style.safetensors", ("style.safetensors", 1.0, None)),
    ("style.safetensors:0.5", ("style.safetensors", 0.5, None)),
    ("style.safetensors:0.5:ink", ("style.safetensors", 0.5, "ink")),
    ("odd:name.safetensors:-0.25:ink", ("odd:name.safetensors", -0.25, "ink")),
    ("odd:name.safetensors:0.7", ("odd:name.safetensors", 0.7, None)),
    ("https://drive.google.com/file/d/abcdefghijkl/view", ("https://drive.google.com/file/d/abcdefghijkl/view", 1.0,
                                                           None)),
    ("https://drive.google.com/file/d/abcdefghijkl/view:0.8:x", ("https://drive.google.com/file/d/abcdefghijkl/view",
                                                                 0.8, "x")),
])
def test_lora_argument(text, parsed):
    assert cli._lora_arg(text) == parsed


def test_adapter_names_come_from_the_file_or_its_run(tmp_path):
    run_a = tmp_path / "runs" / "ink-style" / "lora" / "pytorch_lora_weights.safetensors"
    run_b = tmp_path / "runs" / "watercolor" / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.adapter_name(run_a) == "ink_style"
    assert lora.adapter_name(run_b) == "watercolor"
    assert lora.adapter_name(run_a.parent) == "ink_style"  # the folder of a diffusers LoRA
    assert lora.adapter_name(tmp_path / "exports" / "pytorch_lora_weights.safetensors") == "exports"
    assert lora.adapter_name(tmp_path / "sks-dog.safetensors") == "sks_dog"
    assert lora.adapter_name(tmp_path / "sks-dog.safetensors", taken={"sks_dog"}) == "sks_dog_2"
    assert lora.adapter_name(tmp_path / "sks-dog.safetensors", taken={"sks_dog", "sks_dog_2"}) == "sks_dog_3"


def test_two_project_made_loras_stack(tmp_path, sd):
    from test_lora import make_lora

    files = []
    for i, run in enumerate(("ink", "ink2")):
        folder = tmp_path / run / "lora"
        made = make_lora("sd15", folder, seed=i)
        files.append(made.rename(folder / "pytorch_lora_weights.safetensors"))
    try:
        assert lora.load_lora(sd, files[0], scale=0.5) == "ink"
        assert lora.load_lora(sd, files[1], scale=0.25) == "ink2"
        assert lora.active_loras(sd) == {"ink": 0.5, "ink2": 0.25}
        (tmp_path / "again" / "lora").mkdir(parents=True)
        again = tmp_path / "again" / "lora" / "pytorch_lora_weights.safetensors"
        again.write_bytes(files[0].read_bytes())
        (tmp_path / "x" / "ink").mkdir(parents=True)
        same_name = tmp_path / "x" / "ink" / "pytorch_lora_weights.safetensors"
        same_name.write_bytes(files[0].read_bytes())
        assert lora.load_lora(sd, same_name) == "ink_2"  # a derived name is made unique
        with pytest.raises(ValueError, match="is loaded already, as 'ink'"):  # the same file twice: a slip
            lora.load_lora(sd, files[0])
        with pytest.raises(ValueError, match="A LoRA named 'ink' is loaded already"):  # a chosen one is not
            lora.load_lora(sd, again, name="ink")
    finally:
        lora.unload_loras(sd)


def test_generate_stacks_two_runs_from_the_cli(tmp_path, capsys):
    from test_lora import make_lora

    paths = []
    for i, run in enumerate(("ink", "wash")):
        folder = tmp_path / run / "lora"
        paths.append(make_lora("sd15", folder, seed=i).rename(folder / "pytorch_lora_weights.safetensors"))
    code = cli.main(["generate", "a cat", "--steps", "2", "--seed", "5", "--lora", f"{paths[0]}:0.5",
                     "--lora", f"{paths[1]}:0.75:second", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    with Image.open(capsys.readouterr().out.split()[-1]) as im:
        assert 'Lora: "ink:0.5 second:0.75"' in im.text["parameters"]


# --- HELPERS_HOME / HELPERS_CACHE ------------------------------------------------------------------------------------

def test_doctor_finds_a_home_or_cache_that_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("HELPERS_HOME", str(tmp_path / "file"))
    monkeypatch.setenv("HELPERS_CACHE", str(tmp_path / "cache"))  # not made yet: fine
    (finding,) = doctor.check_folders(doctor.Environment(profile=doctor.runtime.detect_profile(),
                                                         folders=doctor.folder_problems()))
    assert finding.check == "unusable-folder" and "HELPERS_HOME" in finding.problem
    assert "not a folder" in finding.problem and "HELPERS_HOME" in finding.fix


def test_doctor_finds_a_read_only_cache(tmp_path, monkeypatch):
    with read_only_folder(tmp_path / "ro"):
        monkeypatch.setenv("HELPERS_CACHE", str(tmp_path / "ro" / "cache"))  # below a read-only folder
        problems = doctor.folder_problems()
        assert "read-only" in problems["HELPERS_CACHE"]
        monkeypatch.setenv("HELPERS_CACHE", str(tmp_path / "ro"))
        problems = doctor.folder_problems()
        assert "read-only" in problems["HELPERS_CACHE"] and "HELPERS_HOME" not in problems
        (finding,) = doctor.check_folders(doctor.Environment(profile=doctor.runtime.detect_profile(), folders=problems))
        assert "HELPERS_CACHE" in finding.problem and "HELPERS_CACHE" in finding.fix


def test_commands_that_write_to_home_refuse_a_bad_one(tmp_path, monkeypatch, capsys, no_loading):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("HELPERS_HOME", str(tmp_path / "file"))
    line = one_error_line(capsys, cli.main(["generate", "a cat"]))
    assert "HELPERS_HOME" in line and str(tmp_path / "file") in line
    with read_only_folder(tmp_path / "ro"):
        monkeypatch.setenv("HELPERS_HOME", str(tmp_path / "ro"))
        line = one_error_line(capsys, cli.main(["demo", "--steps", "1"]))
        assert "HELPERS_HOME" in line and "read-only" in line
        monkeypatch.setenv("HELPERS_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("HELPERS_CACHE", str(tmp_path / "ro"))
        line = one_error_line(capsys, cli.main(["generate", "a cat", "--out", str(tmp_path / "out")]))
        assert "HELPERS_CACHE" in line and "read-only" in line  # SMOKE MODE builds its tiny models there
