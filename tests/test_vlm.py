"""Chat sessions on the tiny LLaVA-NeXT: turns, images across turns, streaming, undo/reset, overflow, transcripts."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import loading, vlm


@pytest.fixture(scope="module")
def llava():
    return loading.load_llava("llava-1.6-mistral-7b")


def noise(w, h, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def image_token_count(session, inputs):
    return int((inputs["input_ids"] == session.model.config.image_token_index).sum())


def test_ask_answers_and_is_reproducible(llava):
    image = noise(56, 40)
    first = vlm.ask(*llava, image, "What is shown in this image?", max_new_tokens=6)
    assert isinstance(first, str)
    assert vlm.ask(*llava, image, "What is shown in this image?", max_new_tokens=6) == first


def test_second_turn_keeps_the_first_image_in_context(llava):
    session = vlm.ChatSession(*llava, settings=vlm.GenerationSettings(max_new_tokens=4))
    image = noise(64, 48)
    session.send("What is shown in this image?", images=[image])
    inputs = session.inputs([*session.turns, vlm.Turn("user", "What color is it?")])
    assert image_token_count(session, inputs) == session.image_tokens(image) > 0
    assert inputs["pixel_values"].shape[0] == 1
    session.send("What color is it?")
    assert [t.role for t in session.turns] == ["user", "assistant", "user", "assistant"]
    prompt = session.processor.apply_chat_template(session.messages(), add_generation_prompt=True)
    assert prompt.count("<image>") == 1 and "What color is it?" in prompt and prompt.count("[INST]") == 2


def test_several_images_in_one_conversation(llava):
    session = vlm.ChatSession(*llava, settings=vlm.GenerationSettings(max_new_tokens=3))
    a, b = noise(64, 48, 1), noise(32, 64, 2)
    session.send("Describe the image in detail.", images=a)
    session.send("And this one?", images=[b])
    inputs = session.inputs()
    assert inputs["pixel_values"].shape[0] == 2
    assert image_token_count(session, inputs) == session.image_tokens(a) + session.image_tokens(b)


def test_image_from_a_path(llava, tmp_path):
    noise(40, 40).save(tmp_path / "x.png")
    session = vlm.ChatSession(*llava, settings=vlm.GenerationSettings(max_new_tokens=2))
    session.send("What is shown in this image?", images=str(tmp_path / "x.png"))
    assert session.turns[0].images[0].size == (40, 40)


def test_streaming_gives_the_same_answer_as_send(llava):
    settings = vlm.GenerationSettings(max_new_tokens=8)
    image = noise(48, 48, 3)
    sent = vlm.ChatSession(*llava, settings=settings).send("Is there a dog?", images=[image])
    session = vlm.ChatSession(*llava, settings=settings)
    pieces = list(session.stream("Is there a dog?", images=[image]))
    assert "".join(pieces).strip() == sent == session.turns[-1].text


def test_a_stream_closed_early_stops_and_keeps_nothing(llava):
    session = vlm.ChatSession(*llava, settings=vlm.GenerationSettings(max_new_tokens=16))
    stream = session.stream("Describe the image in detail.", images=[noise(48, 48)])
    next(stream, None)
    stream.close()
    assert session.turns == []


def test_undo_and_reset(llava):
    session = vlm.ChatSession(*llava, settings=vlm.GenerationSettings(max_new_tokens=2))
    session.send("What is shown in this image?", images=[noise(32, 32)])
    session.send("What color is it?")
    session.undo()
    assert [t.text for t in session.turns if t.role == "user"] == ["What is shown in this image?"]
    session.reset()
    assert session.turns == []
    with pytest.raises(ValueError, match="Nothing to undo"):
        session.undo()


def test_sampling_with_a_seed_is_reproducible(llava):
    settings = vlm.GenerationSettings(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    image = noise(32, 32)
    a = vlm.ChatSession(*llava, settings=settings).send("Hi?", images=[image])
    b = vlm.ChatSession(*llava, settings=settings).send("Hi?", images=[image])
    assert a == b


def test_overflow_is_refused_before_the_model_runs(llava, monkeypatch):
    session = vlm.ChatSession(*llava, settings=vlm.GenerationSettings(max_new_tokens=4), image_budget="high")
    monkeypatch.setattr(vlm.ChatSession, "context_limit", property(lambda self: 100))
    with pytest.raises(ValueError, match=r"This turn needs \d+ prompt tokens \+ 4 new tokens, more than the model's "
                                         r"context of 100 tokens \(images take \d+ tokens\)"):
        session.send("What is shown in this image?", images=[noise(64, 64)])
    assert session.turns == []


def test_overflow_can_drop_the_oldest_turns_and_says_so(llava, monkeypatch, capsys):
    session = vlm.ChatSession(*llava, settings=vlm.GenerationSettings(max_new_tokens=2), on_overflow="drop_oldest",
                              image_budget="high")
    session.send("What is shown in this image?", images=[noise(32, 32)])
    first_len = session.inputs()["input_ids"].shape[1]
    monkeypatch.setattr(vlm.ChatSession, "context_limit", property(lambda self: first_len + 4))
    session.send("Describe the image in detail.", images=[noise(32, 32, 5)])
    assert "dropped the oldest 2 message(s) and 1 image(s)" in capsys.readouterr().out
    assert len(session.images) == 1 and session.turns[0].text == "Describe the image in detail."


@pytest.mark.parametrize("text, images, message", [
    ("", [Image.new("RGB", (32, 32))], "The question must be a non-empty string"),
    ("   ", None, "The question must be a non-empty string"),
    (None, None, "The question must be a non-empty string"),
    ("What is this?", None, "No image yet"),
])
def test_bad_turns(llava, text, images, message):
    with pytest.raises(ValueError, match=message):
        vlm.ChatSession(*llava).send(text, images=images)


def test_ask_needs_an_image(llava):
    with pytest.raises(ValueError, match="`image` is missing"):
        vlm.ask(*llava, None, "What is this?")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "`max_new_tokens` must be a positive integer"),
    ({"temperature": -1}, "`temperature` must be 0"), ({"top_p": 0}, r"`top_p` must be in \(0, 1\]")])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vlm.GenerationSettings(**kwargs)


def test_transcript_export_round_trips(llava, tmp_path):
    session = vlm.ChatSession(*llava, system_prompt="Answer briefly.",
                              settings=vlm.GenerationSettings(max_new_tokens=3, temperature=0.5, seed=1))
    image = noise(40, 32)
    session.send("What is shown in this image?", images=[image])
    session.send("What color is it?")
    md, js = session.export(tmp_path / "chat")
    assert md.read_text().count("**You:**") == 2 and "![image images/image-01.png](images/image-01.png)" in md.read_text()
    restored = vlm.ChatSession.load(js, *llava)
    assert restored.system_prompt == "Answer briefly." and restored.settings == session.settings
    assert [(t.role, t.text) for t in restored.turns] == [(t.role, t.text) for t in session.turns]
    assert np.array_equal(np.asarray(restored.images[0]), np.asarray(image))
    assert torch.equal(restored.inputs()["input_ids"], session.inputs()["input_ids"])


def test_loading_something_else_than_a_transcript(llava, tmp_path):
    (tmp_path / "t.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="is not a chat transcript of this project"):
        vlm.ChatSession.load(tmp_path / "t.json", *llava)


def test_an_image_budget_caps_the_tokens_an_image_takes_and_the_model_agrees(llava):
    """The tiny model's grid is 2x1, 1x2 and 2x2 tiles of 32 px: "low" keeps one tile, "medium" two."""
    model, processor = llava
    grid = [list(p) for p in model.config.image_grid_pinpoints]
    image = noise(200, 120)   # a wide photo: its best grid at "high" is 2x2, at "medium" 2x1, at "low" one tile
    tokens = {}
    for budget in ("low", "medium", "high"):
        session = vlm.ChatSession(model, processor, settings=vlm.GenerationSettings(max_new_tokens=3),
                                  image_budget=budget)
        tokens[budget] = session.image_tokens(image)
        answer = session.send("What is shown in this image?", images=[image])   # features match tokens, or raises
        assert isinstance(answer, str)
        assert image_token_count(session, session.inputs(session.turns[:1])) == tokens[budget]
    assert tokens["low"] < tokens["medium"] < tokens["high"]
    assert [list(p) for p in model.config.image_grid_pinpoints] == grid == \
        [list(p) for p in processor.image_processor.image_grid_pinpoints]   # restored after each use


def test_auto_steps_the_budget_down_before_a_turn_is_refused(llava, monkeypatch, capsys):
    model, processor = llava
    image = noise(64, 64)
    low = vlm.ChatSession(model, processor, image_budget="low").inputs([vlm.Turn("user", "What is this?", [image])])
    monkeypatch.setattr(vlm.ChatSession, "context_limit", property(lambda self: low["input_ids"].shape[1] + 3))
    session = vlm.ChatSession(model, processor, settings=vlm.GenerationSettings(max_new_tokens=3))
    session.send("What is this?", images=[image])
    out = capsys.readouterr().out
    assert "Images at the 'low' budget" in out or "Images at the 'medium' budget" in out   # equal for a square
    assert len(session.turns) == 2 and session._budget != "high"
    strict = vlm.ChatSession(model, processor, settings=vlm.GenerationSettings(max_new_tokens=3),
                             image_budget="high")
    with pytest.raises(ValueError, match="image_budget='low'"):
        strict.send("What is this?", images=[image])


def test_captions_take_an_image_budget_and_a_bad_one_is_named(llava, tmp_path):
    from helpers import captions

    noise(64, 64).save(tmp_path / "a.png")
    report = captions.caption_folder(tmp_path, *llava, style="short", image_budget="low", progress=False)
    assert report.written == [tmp_path / "a.png"] and (tmp_path / "a.txt").is_file()
    with pytest.raises(ValueError, match=r"`image_budget` must be one of 'low', 'medium', 'high', 'auto', not 'tiny'"):
        vlm.ChatSession(*llava, image_budget="tiny")
