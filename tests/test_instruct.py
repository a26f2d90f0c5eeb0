"""Instruction data from captions: records of the three kinds, checked, resumable, retried; bad input named."""
import json

import numpy as np
import pytest
from PIL import Image

from helpers import instruct

GOOD = {"conversation": "Sure.\nQuestion: What is it?\nAnswer: A red square.\nQuestion: Why red?\nAnswer: It was "
                        "painted so.",
        "detail": "A red square sits on a white ground, alone and sharp-edged.",
        "reasoning": "Question: What might it be for?\nAnswer: Its plain shape and bright colour suggest a sign."}


def kind_of(messages):
    system = messages[0]["content"]
    return next(k for k in instruct.KINDS if system == instruct.prompts(k)["system"])


def stub(calls=None, bad_first: int = 0):
    """A language model that answers each kind well-formed; the first `bad_first` calls of each prompt malformed."""
    seen = {}

    def lm(messages):
        key = (kind_of(messages), messages[-1]["content"])
        seen[key] = seen.get(key, 0) + 1
        if calls is not None:
            calls.append(key)
        return "no structure at all" if seen[key] <= bad_first and key[0] != "detail" else GOOD[key[0]]
    return lm


def folder_of(tmp_path, names=("a.png", "sub/b.png"), captions=True):
    folder = tmp_path / "data"
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.RandomState(i).rand(40, 48, 3) * 255).astype("uint8")).save(folder / name)
        if captions:
            (folder / name).with_suffix(".txt").write_text(f"a red square, number {i}\n", encoding="utf-8")
    return folder


def test_records_of_all_kinds_checked_and_a_rerun_changes_nothing(tmp_path):
    folder = folder_of(tmp_path)
    report = instruct.generate_instructions(folder, stub(), progress=False)
    assert report.written == 6 and not report.failed
    path = folder / instruct.DEFAULT_NAME
    records = instruct.read_records(path)
    assert sorted({r["image"] for r in records}) == ["a.png", "sub/b.png"]
    assert sorted(r["kind"] for r in records if r["image"] == "a.png") == sorted(instruct.KINDS)
    for r in records:
        text = json.dumps(r["conversations"])
        assert text.count("<image>") == 1 and r["conversations"][0]["value"].startswith("<image>\n")
        assert [t["from"] for t in r["conversations"]] == ["human", "gpt"] * (len(r["conversations"]) // 2)
    conversation = next(r for r in records if r["kind"] == "conversation")
    values = [t["value"] for t in conversation["conversations"]]
    assert values[1:] == ["A red square.", "Why red?", "It was painted so."]
    before = path.read_bytes()
    calls = []
    again = instruct.generate_instructions(folder, stub(calls), progress=False)
    assert again.written == 0 and again.skipped == 6 and calls == [] and path.read_bytes() == before


def test_the_caption_reaches_the_prompt_with_system_message_and_examples(tmp_path):
    calls = []
    instruct.generate_instructions(folder_of(tmp_path, ["a.png"]), stub(calls), kinds="detail", progress=False)
    messages = instruct.build_messages("detail", "a red square, number 0")
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 2 + ["user"]
    assert calls == [("detail", "a red square, number 0")]


def test_a_malformed_generation_is_retried_then_reported_never_written(tmp_path):
    folder = folder_of(tmp_path, ["a.png"])
    report = instruct.generate_instructions(folder, stub(bad_first=1), kinds="conversation,reasoning", progress=False)
    assert report.written == 2 and report.retried == 2 and not report.failed
    other = folder_of(tmp_path / "x", ["a.png"])
    report = instruct.generate_instructions(other, stub(bad_first=99), kinds="conversation", retries=2,
                                            progress=False)
    assert report.written == 0 and report.retried == 2
    assert "no valid conversation after 3 tries" in report.failed["a.png (conversation 0)"]
    assert (other / instruct.DEFAULT_NAME).read_text() == ""
    # the failed one is tried again on the next run
    assert instruct.generate_instructions(other, stub(), kinds="conversation", progress=False).written == 1


def test_a_killed_run_keeps_every_finished_record_and_resumes(tmp_path):
    folder = folder_of(tmp_path, ["a.png", "b.png", "c.png"])
    good, count = stub(), [0]

    def dies(messages):
        count[0] += 1
        if count[0] == 5:
            raise KeyboardInterrupt
        return good(messages)

    with pytest.raises(KeyboardInterrupt):
        instruct.generate_instructions(folder, dies, progress=False)
    path = folder / instruct.DEFAULT_NAME
    assert len(instruct.read_records(path)) == 4
    with path.open("a") as f:   # a kill in the middle of writing a line
        f.write('{"id": "c.png:detail:0", "image": "c.p')
    report = instruct.generate_instructions(folder, stub(), progress=False)
    assert report.written == 5 and report.skipped == 4
    records = instruct.read_records(path)
    assert len(records) == 9 and len({r["id"] for r in records}) == 9


def test_a_broken_line_is_named_and_the_file_kept(tmp_path):
    folder = folder_of(tmp_path, ["a.png"])
    instruct.generate_instructions(folder, stub(), progress=False)
    path = folder / instruct.DEFAULT_NAME
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    broken = path.read_bytes()
    with pytest.raises(ValueError, match=r"line 2 is not a valid record: not JSON.*other 3 line"):
        instruct.generate_instructions(folder, stub(), progress=False)
    assert path.read_bytes() == broken
    bad = json.loads(lines[0])
    bad["conversations"][1]["value"] += " <image>"
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"line 1 .*turn 2 holds 1 <image>"):
        instruct.read_records(path)


def test_bad_input_is_named_and_the_others_done(tmp_path):
    folder = folder_of(tmp_path, ["a.png", "b.png", "c.png"])
    (folder / "b.txt").unlink()
    (folder / "c.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    report = instruct.generate_instructions(folder, stub(), kinds="detail", progress=False)
    assert report.written == 1 and [p.name for p in report.no_caption] == ["b.png"]
    assert "not UTF-8" in report.failed["c.png"] and "b.png" in str(report) and "caption them" in str(report)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        instruct.generate_instructions(tmp_path / "empty", stub(), progress=False)
    with pytest.raises(ValueError, match="`kinds` must name"):
        instruct.generate_instructions(folder, stub(), kinds="poems", progress=False)


def test_overwrite_keeps_the_old_file_as_bak(tmp_path):
    folder = folder_of(tmp_path, ["a.png"])
    instruct.generate_instructions(folder, stub(), kinds="detail", progress=False)
    path = folder / instruct.DEFAULT_NAME
    old = path.read_text()
    report = instruct.generate_instructions(folder, stub(), kinds="detail", overwrite=True, progress=False)
    assert report.written == 1 and (folder / "instruct.jsonl.bak").read_text() == old


def test_check_record_refuses_what_llava_cannot_train_on():
    good = instruct.make_record("a.png", "reasoning", 0, [("Why?", "Because.")])
    instruct.check_record(good)
    cases = {"two <image>": [{"from": "human", "value": "<image>\n<image> Why?"}, {"from": "gpt", "value": "B"}],
             "none": [{"from": "human", "value": "Why?"}, {"from": "gpt", "value": "B"}],
             "order": [{"from": "gpt", "value": "<image>\nWhy?"}, {"from": "human", "value": "B"}],
             "empty": [{"from": "human", "value": "<image>\nWhy?"}, {"from": "gpt", "value": "  "}],
             "odd": [{"from": "human", "value": "<image>\nWhy?"}]}
    for turns in cases.values():
        with pytest.raises(ValueError):
            instruct.check_record({**good, "conversations": turns})


def test_to_messages_in_trl_and_llama_factory_forms(tmp_path):
    record = instruct.make_record("sub/b.png", "conversation", 0, [("What?", "A."), ("More?", "B.")])
    trl = instruct.to_messages(record)
    assert trl["images"] == ["sub/b.png"]
    assert trl["messages"][0] == {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}
    assert [m["role"] for m in trl["messages"]] == ["user", "assistant", "user", "assistant"]
    lf = instruct.to_messages(record, content="text", image_root="/data")
    assert lf["messages"][0]["content"] == "<image>\nWhat?" and lf["images"] == ["/data/sub/b.png"]
    src = tmp_path / "r.jsonl"
    instruct.save_records(src, [record])
    out = instruct.convert_file(src, tmp_path / "m.jsonl")
    assert json.loads(out.read_text()) == trl


def test_the_loaded_tiny_llava_writes_records_text_only(tmp_path):
    from helpers import loading

    model, processor = loading.load_llava("llava-1.6-mistral-7b")
    lm = instruct.text_generator(model, processor)
    prompt = lm.prompt(instruct.build_messages("detail", "a red square"))
    assert prompt.startswith(instruct.prompts("detail")["system"]) and "[INST] a red square [/INST]" in prompt
    folder = folder_of(tmp_path, ["a.png"])
    report = instruct.generate_instructions(folder, lm, kinds="detail,conversation", retries=0, progress=False)
    # random weights write noise: a description of noise is still a description; a conversation needs its lines
    assert report.written == 1 and list(report.failed) == ["a.png (conversation 0)"]
    (record,) = instruct.read_records(folder / instruct.DEFAULT_NAME)
    assert record["kind"] == "detail" and record["conversations"][1]["value"]
    processor.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        instruct.text_generator(model, processor)


def test_review_panel_saves_edits_and_refuses_a_broken_one(tmp_path):
    folder = folder_of(tmp_path, ["a.png", "b.png"])
    instruct.generate_instructions(folder, stub(), kinds="detail,reasoning", progress=False)
    path = folder / instruct.DEFAULT_NAME
    panel = instruct.review_panel(path)
    assert panel.image.value == "a.png" and len(panel.boxes) == 4
    panel.boxes[1].value = "An edited description."
    panel.save_button.click()
    assert "Saved 4 record(s)" in panel.status.value
    records = instruct.read_records(path)
    assert records[0]["conversations"][1]["value"] == "An edited description." and len(records) == 4
    panel.image.value = "b.png"
    before = path.read_bytes()
    panel.boxes[0].value = "no image token here"
    panel.save_button.click()
    assert "Nothing was saved" in panel.status.value and path.read_bytes() == before


def test_cli_writes_records_and_a_rerun_changes_nothing(tmp_path, monkeypatch):
    folder = folder_of(tmp_path, ["a.png"])
    monkeypatch.setattr(instruct, "load_text_lm", lambda name: stub())
    out = tmp_path / "F.jsonl"
    from helpers import cli

    assert cli.main(["instruct", str(folder), "--out", str(out)]) == 0   # python -m helpers instruct ...
    first = out.read_bytes()
    assert sorted(r["kind"] for r in instruct.read_records(out)) == sorted(instruct.KINDS)
    assert cli.main(["instruct", str(folder), "--out", str(out), "--kinds", "detail"]) == 0
    assert out.read_bytes() == first
