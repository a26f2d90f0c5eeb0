"""A1111 parity (issue 13): the infotext written and read as A1111 1.10 does, every sampler x schedule type through a
PNG and back, `<lora:>` tags, BREAK, prompt editing and seeds in generate."""
import hashlib
import re

import numpy as np
import pytest
from PIL import Image

from helpers import diffusion, images, samplers
from test_lora import make_lora

# Real infotexts, as A1111 1.10, Forge and A1111 1.6 write them (the settings line is A1111's create_infotext)
A1111_110 = ('masterpiece, best quality, 1girl, <lora:add_detail:0.8>\n'
             'Negative prompt: (worst quality:1.4), lowres\n'
             'Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, '
             'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.5, Clip skip: 2, '
             'Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, '
             'Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1')
FORGE = ('a cat in a hat\nSteps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, '
         'Seed: 42, Size: 896x1152, Model hash: 0123456789, Model: flux1-dev-bnb-nf4-v2, '
         'Version: f2.0.1v1.10.1-previous-313-g8a042934, Module 1: ae, Module 2: clip_l')
OLD = ('a house on a hill\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M SDE Karras, CFG scale: 7, '
       'Seed: 4294967296, Size: 985x1266, Model hash: abcdef0123, Denoising strength: 0.4, Hires resize: 1970x2532, '
       'Hires upscaler: R-ESRGAN 4x+, Hires prompt: "masterpiece" style, Version: v1.6.0')


@pytest.mark.parametrize("value, written", [
    ("plain", "plain"), ("a, b", '"a, b"'), ("name: 1234", '"name: 1234"'), ("two\nlines", '"two\\nlines"'),
    ('"masterpiece" style', '"masterpiece" style'), ("ünïcode, ok", '"ünïcode, ok"'), (7.5, "7.5")])
def test_values_are_quoted_only_for_a_comma_a_colon_or_a_line_break(value, written):
    assert images.quote(value) == written
    text = images.parameters_text("p", Steps=1, Sampler="Euler", Seed=1, Field=value)
    assert text.endswith(f"Field: {written}")
    assert images.parse_parameters(text)["Field"] == str(value)   # and read back whole


def test_fields_come_in_create_infotexts_order():
    text = images.parameters_text("p", Version="v", Lora_hashes="a: 1", Hires_upscale=2, Seed=3, Model="m",
                                  Schedule_type="Karras", Steps=4, Sampler="DPM++ 2M", CFG_scale=7, Size="8x8",
                                  Model_hash="abc", Denoising_strength=0.5, Clip_skip=2, Hires_upscaler="Latent",
                                  Empty=None)
    keys = [k for k, _ in re.findall(r"(?:^|, )([\w ]+): (\"[^\"]*\"|[^,]*)", text.splitlines()[-1])]
    assert keys == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
                    "Denoising strength", "Clip skip", "Lora hashes", "Hires upscale", "Hires upscaler", "Version"]


@pytest.mark.parametrize("text", [A1111_110, FORGE, OLD, "just a prompt", "a\nb: c", 'x\nSteps: "unclosed, a: b',
                                  'p\nA: "\\u00", B: 1, C: 2', 'p\nA: "x" y, B: "z", C: 3', ":::\n,,,\n: : :"])
def test_any_a1111_text_is_read_without_an_error(text):
    params = images.parse_parameters(text)
    assert isinstance(params["prompt"], str) and all(isinstance(v, str) for v in params.values())


def test_a1111_110_infotext_is_read_and_remade_as_a1111_would():
    params = images.parse_parameters(A1111_110)
    assert params["prompt"] == "masterpiece, best quality, 1girl, <lora:add_detail:0.8>"
    assert params["Lora hashes"] == "add_detail: 7c6bad76eb54" and params["Version"] == "v1.10.1"
    kwargs = diffusion.settings_from_parameters(params)
    assert kwargs == {"prompt": params["prompt"], "negative_prompt": "(worst quality:1.4), lowres",
                      "num_inference_steps": 25, "guidance_scale": 7.0, "seed": 1234567890, "clip_skip": 2,
                      "hires_strength": 0.5, "hires_steps": 10, "sampler": "DPM++ 2M", "schedule_type": "Karras",
                      "width": 512, "height": 768, "hires_scale": 2.0, "hires_upscaler": "Latent"}


def test_forge_and_old_infotexts_unknown_fields_are_kept_and_ignored(capsys):
    forge = images.parse_parameters(FORGE)
    assert forge["Distilled CFG Scale"] == "3.5" and forge["Module 2"] == "clip_l"
    assert diffusion.settings_from_parameters(forge)["schedule_type"] == "Simple"
    old = images.parse_parameters(OLD)
    assert old["Hires prompt"] == '"masterpiece" style'    # unquoted by A1111, so not unquoted here
    kwargs = diffusion.settings_from_parameters(old)
    out = capsys.readouterr().out
    assert (kwargs["sampler"], kwargs["schedule_type"]) == ("DPM++ 2M SDE", "Karras")
    assert (kwargs["width"], kwargs["height"], kwargs["seed"]) == (984, 1264, 4294967296)
    assert "985x1266 is not a multiple of 8" in out and "remade at 984x1264" in out
    assert kwargs["hires_scale"] == pytest.approx(max(1970 / 984, 2532 / 1264)) and kwargs["hires_strength"] == 0.4
    assert kwargs["hires_upscaler"] == "Lanczos" and "'R-ESRGAN 4x+' is not part of this kit" in out


@pytest.mark.parametrize("sampler, message", [("DPM++ 2S a", "use 'DPM2 a'"), ("Restart", "use 'Heun'"),
                                              ("DPM fast", "use 'DPM\\+\\+ 2M'"), ("Nope", "Unknown sampler 'Nope'")])
def test_samplers_this_kit_lacks_are_refused_naming_the_value(sampler, message):
    params = images.parse_parameters(f"p\nSteps: 20, Sampler: {sampler}, Seed: 1, Size: 64x64")
    with pytest.raises(ValueError, match=message):
        diffusion.settings_from_parameters(params)


def _pairs():
    pairs = []
    for name in samplers.SAMPLERS:
        for schedule in samplers.SCHEDULE_TYPES:
            class_name = samplers.SAMPLERS[name][0]
            import diffusers

            accepted = samplers._accepted(getattr(diffusers, class_name))
            if all(k in accepted for k in samplers.SCHEDULE_TYPES[schedule]):
                pairs.append((name, schedule))
    return pairs


def test_every_sampler_x_schedule_type_round_trips_through_a_png(sd, tmp_path):
    pairs = _pairs()
    assert len(pairs) > 100
    for name, schedule in pairs:
        samplers.set_sampler(sd, name, schedule)
        text = images.parameters_text("a cat", Steps=20, Sampler=samplers.sampler_name(sd),
                                      Schedule_type=samplers.schedule_type(sd), CFG_scale=7, Seed=1, Size="64x64")
        path = images.save_image(Image.new("RGB", (8, 8)), tmp_path, text)
        kwargs = diffusion.settings_from_parameters(images.read_parameters(path))
        resolved = samplers.resolve(name, schedule)
        assert (kwargs["sampler"], kwargs["schedule_type"]) == (name, resolved)
        before = dict(sd.scheduler.config)
        samplers.set_sampler(sd, kwargs["sampler"], kwargs["schedule_type"])   # remade: the same scheduler
        assert dict(sd.scheduler.config) == before, (name, schedule)


def test_default_png_names_dpm_2m_karras_and_karras_sigmas_run(sd, tmp_path):
    result = diffusion.generate(sd, "a photo of a cat", num_inference_steps=3, seed=1, progress=False)
    assert "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1, Size: 64x64" \
        in result.parameters[0]
    assert "PNDM" not in result.parameters[0] and re.search(r"Version: llava-sd-notebooks \S+$", result.parameters[0])
    assert type(sd.scheduler).__name__ == "DPMSolverMultistepScheduler" and sd.scheduler.config.use_karras_sigmas
    params = images.read_parameters(result.save(tmp_path)[0])
    again = diffusion.generate(sd, **diffusion.settings_from_parameters(params), progress=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))


def test_seeds_of_a_batch_are_not_wrapped_at_2_32(sd):
    result = diffusion.generate(sd, "a cat", num_inference_steps=1, seed=2**32 - 1, num_images_per_prompt=2,
                                progress=False)
    assert result.seeds == [2**32 - 1, 2**32] and "Seed: 4294967296" in result.parameters[1]
    with pytest.raises(ValueError, match="`seed` must be an integer from 0 to 18446744073709551614"):
        diffusion.generate(sd, "a cat", seed=2**64 - 1, num_images_per_prompt=2, progress=False)


# --- <lora:NAME:W> tags ------------------------------------------------------------------------------------------

@pytest.fixture
def lora_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HELPERS_HOME", str(tmp_path))
    folder = tmp_path / "models" / "loras"
    folder.mkdir(parents=True)
    path = make_lora("sd15", folder)
    return path.rename(folder / "mystyle.safetensors")


def _image(pipe, prompt, **kwargs):
    result = diffusion.generate(pipe, prompt, num_inference_steps=3, seed=4, progress=False, **kwargs)
    return np.asarray(result.images[0], dtype=np.int16), result


def test_lora_tags_load_from_models_loras_and_never_reach_the_text_encoder(sd, lora_home, monkeypatch):
    from helpers import lora, prompts

    seen = []
    original = diffusion._prompt_kwargs
    monkeypatch.setattr(diffusion, "_prompt_kwargs", lambda pipe, family, prompt, *a: seen.append(prompt) or
                        original(pipe, family, prompt, *a))
    base, _ = _image(sd, "a photo of a cat")
    zero, result = _image(sd, "a photo of a cat <lora:mystyle:0>")
    assert np.array_equal(zero, base) and seen[-1] == "a photo of a cat "
    one, result = _image(sd, "a photo of a cat <lora:mystyle:1>")
    assert np.abs(one - base).max() > 5 and lora.active_loras(sd) == {"mystyle": 1.0}
    short = hashlib.sha256(lora_home.read_bytes()).hexdigest()[:12]
    assert f'Lora hashes: "mystyle: {short}"' in result.parameters[0]
    assert "a photo of a cat <lora:mystyle:1>\n" in result.parameters[0] and "Lora: " not in result.parameters[0]
    params = images.parse_parameters(result.parameters[0])
    assert diffusion.settings_from_parameters(params)["prompt"] == "a photo of a cat <lora:mystyle:1>"
    again, _ = _image(sd, "a photo of a cat")          # a later prompt without the tag: unloaded
    assert lora.active_loras(sd) == {} and np.array_equal(again, base)
    assert prompts.extract_loras("<lyco:a:0.5> x <lora:b>") == (" x ", [("a", 0.5), ("b", 1.0)])


def test_a_missing_lora_tag_names_the_folders_searched(sd, tmp_path, monkeypatch):
    monkeypatch.setenv("HELPERS_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"No LoRA 'missing' for the prompt's <lora:missing:\.\.\.> tag: "
                                                r"looked for missing\.safetensors in .*models/loras .*runs/\*/lora"):
        diffusion.generate(sd, "a cat <lora:missing:1>", num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"The weight in '<lora:x:strong>' is not a number"):
        diffusion.generate(sd, "a cat <lora:x:strong>", num_inference_steps=1, progress=False)


# --- BREAK, prompt editing, alternation, AND -------------------------------------------------------------------

def test_break_starts_a_new_77_token_chunk(sd):
    from helpers import prompts

    one = prompts.encode(sd, "a cat, a dog")["prompt_embeds"]
    two = prompts.encode(sd, "a cat BREAK a dog")["prompt_embeds"]
    assert one.shape[1] == 77 and two.shape[1] == 154
    first = prompts.encode(sd, "a cat")["prompt_embeds"]
    assert np.allclose(two[:, :77].numpy(), first.numpy(), atol=1e-6)


def test_prompt_editing_switches_the_embeddings_during_sampling(sd):
    cat, _ = _image(sd, "a photo of a cat")
    dog, _ = _image(sd, "a photo of a dog")
    edited, result = _image(sd, "a photo of a [cat:dog:0.5]")
    assert not np.array_equal(edited, cat) and not np.array_equal(edited, dog)
    assert "a photo of a [cat:dog:0.5]" in result.parameters[0]
    never, _ = _image(sd, "a photo of a [cat:dog:2.5]")   # step 2 of 3: cat, cat, dog
    assert not np.array_equal(never, cat)
    late, _ = _image(sd, "a photo of a [cat:dog:9]")      # after the last step: the whole image is a cat
    assert np.abs(late - cat).max() <= 1
    alternating, _ = _image(sd, "a photo of a [cat|dog]")
    assert not np.array_equal(alternating, cat)


@pytest.mark.parametrize("prompt", ["a [cat", "a cat]", "a [cat:dog", "(a [b:c:0.5)]", "[a:b:c:0.5]", "[[a|b]",
                                    "a [x:y:-1]"])
def test_unbalanced_or_odd_brackets_give_an_image_never_a_traceback(sd, prompt):
    image, result = _image(sd, prompt)
    assert image.shape == (64, 64, 3) and prompt in result.parameters[0]


def test_and_is_refused_in_one_line(sd):
    with pytest.raises(ValueError, match=r"`prompt` uses AND \(A1111's composable diffusion\)"):
        diffusion.generate(sd, "a cat AND a dog", progress=False)


def test_latent_hires_fix_is_the_default_and_lanczos_the_other(sd):
    latent, result = _image(sd, "a cat", width=48, height=64, hires_scale=1.5)
    assert latent.shape == (96, 72, 3) and "Hires upscaler: Latent" in result.parameters[0]
    lanczos, result = _image(sd, "a cat", width=48, height=64, hires_scale=1.5, hires_upscaler="lanczos")
    assert "Hires upscaler: Lanczos" in result.parameters[0] and not np.array_equal(latent, lanczos)
    with pytest.raises(ValueError, match="`hires_upscaler` must be one of Latent, .*Lanczos, Nearest, not 'ESRGAN'"):
        _image(sd, "a cat", hires_scale=1.5, hires_upscaler="ESRGAN")
