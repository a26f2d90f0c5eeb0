"""The LLaVA fine-tune on the tiny LLaVA-NeXT (CPU, fp32): assistant-only labels, lengths that never cut image tokens,
a loss that falls, exact resume, an adapter that loads and changes the answers, bad input named."""
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.image_processing_utils import select_best_resolution

from helpers import instruct, loading, tiny, vlm
from helpers.training import llava

ANSWERS = ["The image shows a red car.", "It is red.", "A cat on a sofa.", "Yes, there is a dog."]


def noise(w, h, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def processors():
    return {fmt: AutoProcessor.from_pretrained(tiny.ensure(f"llava-next-{fmt}")) for fmt in ("mistral", "vicuna",
                                                                                               "chatml")}


def conversation():
    record = instruct.make_record("a.png", "conversation", 0, [("What is shown in this image?", ANSWERS[0]),
                                                              ("What color is it?", ANSWERS[1])])
    return instruct.to_messages(record)["messages"]


@pytest.mark.parametrize("fmt", ["mistral", "vicuna", "chatml"])
def test_only_the_assistant_turns_carry_labels_token_by_token(processors, fmt):
    processor = processors[fmt]
    messages = conversation()
    example = llava.build_example(processor, messages, noise(48, 40))
    ids, labels = example["input_ids"][0].tolist(), example["labels"][0].tolist()
    assert len(ids) == len(labels)
    text, spans = llava.assistant_spans(processor, messages)
    assert [text[a:b].strip() for a, b in spans][0].startswith(ANSWERS[0])
    runs, run = [], []
    for i, (token, label) in enumerate(zip(ids, labels)):
        assert label in (llava.IGNORE, token)   # a label is its own input id (the model shifts), or ignored
        if token == processor.image_token_id:
            assert label == llava.IGNORE
        if label != llava.IGNORE:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    # each labelled run of tokens is exactly one assistant turn, with the template's end of turn
    decoded = [processor.tokenizer.decode(r).strip() for r in runs]
    assert decoded == [text[a:b].strip() for a, b in spans]
    assert [d.replace("</s>", "").replace("<|im_end|>", "").strip() for d in decoded] == ANSWERS[:2]
    prompt = processor.tokenizer.decode([t for t, lab in zip(ids, labels) if lab == llava.IGNORE])
    assert "What is shown in this image?" in prompt and "What color is it?" in prompt
    assert ANSWERS[0] not in prompt


@pytest.fixture(scope="module")
def model():
    return loading.load_llava("llava-1.6-mistral-7b")


def test_lengths_never_cut_image_tokens_for_every_grid_shape(model):
    model, processor = model
    shapes = {}
    for size in [(60, 20), (20, 60), (40, 40), (100, 100), (700, 300)]:
        image = noise(*size)
        grid = tuple(select_best_resolution((size[1], size[0]), tiny.PINPOINTS))
        example = llava.build_example(processor, conversation(), image)
        n = int((example["input_ids"] == model.config.image_token_index).sum())
        assert n == llava.image_tokens(processor, image) == vlm.ChatSession(model, processor).image_tokens(image)
        with torch.no_grad():   # "Image features and image tokens do not match" where a length cut them
            out = model(**{k: v for k, v in example.items()})
        assert torch.isfinite(out.loss)
        shapes.setdefault(grid, n)
    assert set(shapes) == {tuple(p) for p in tiny.PINPOINTS}
    assert len(set(shapes.values())) == 3   # each grid shape its own count
    large = noise(100, 100)
    small = llava.fit_image(large, 32)   # the image budget: a smaller grid, fewer tokens
    assert small.size == (32, 32) and llava.image_tokens(processor, small) < llava.image_tokens(processor, large)
    assert "image tokens" in llava.describe_budget(processor, 32)


def dataset(tmp_path, n=6):
    folder = tmp_path / "data"
    folder.mkdir()
    records = []
    for i in range(n):
        noise(32 + 8 * i, 40, seed=i).save(folder / f"{i}.png")
        records.append(instruct.make_record(f"{i}.png", "detail", 0, [(None, ANSWERS[i % 2])]))
    instruct.save_records(folder / "instruct.jsonl", records)
    return folder / "instruct.jsonl"


def config(tmp_path, run, **kw):
    values = dict(data=str(dataset(tmp_path) if not (tmp_path / "data").exists() else tmp_path / "data" /
                           "instruct.jsonl"), run_dir=str(tmp_path / run), max_train_steps=4,
                  gradient_accumulation_steps=2, learning_rate=2e-2, checkpoint_every=2, eval_fraction=0.34,
                  lora_dropout=0.1)
    return llava.LlavaTrainConfig(**{**values, **kw})


def adapter_tensors(run_dir):
    return safetensors.torch.load_file(str(run_dir / llava.ADAPTER_DIR / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llava-run")
    c = config(tmp, "whole")
    return c, llava.train_llava(c, progress=False)


def test_loss_falls_and_the_adapter_is_saved_with_its_card(trained):
    c, result = trained
    assert result.steps == 4 and len(result.losses) == 4 and result.losses[-1] < result.losses[0]
    assert result.eval_after < result.eval_before and result.eval_records == 2 and result.train_records == 4
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= files
    card = (result.adapter_dir / "README.md").read_text()
    assert "6 records of 6 images" in card and "Steps: 4" in card and f"{result.eval_after:.4f} after" in card
    keys = adapter_tensors(result.run_dir)
    assert keys and all("language_model" in k and "lora_" in k for k in keys)   # never the vision tower
    ckpt = result.run_dir / "checkpoint-4"
    assert {p.name for p in ckpt.iterdir()} >= {"adapter_0.safetensors", "optimizer.bin", "scheduler.bin"}
    assert not list(ckpt.glob("model*.safetensors"))   # the frozen base is never in a checkpoint
    assert json.loads((result.run_dir / "eval.json").read_text())["after"] == result.eval_after


def test_a_killed_run_resumed_ends_with_the_same_adapter(tmp_path, trained):
    c, result = trained
    resumed = config(tmp_path, "cut", data=c.data)
    first = llava.train_llava(resumed, stop_after=2, progress=False)
    assert first.steps == 2 and first.adapter_dir is None
    second = llava.train_llava(resumed, progress=False)
    assert second.resumed_from == 2 and second.steps == 4
    assert second.losses == result.losses and second.eval_before == result.eval_before
    a, b = adapter_tensors(result.run_dir), adapter_tensors(second.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_adapter_loads_and_changes_the_answers(trained):
    _, result = trained
    base, processor = loading.load_llava("llava-1.6-mistral-7b")
    image = noise(48, 40, seed=1)
    before = vlm.ask(base, processor, image, "Describe the image in detail.", max_new_tokens=8)
    tuned = llava.load_adapter(base, result.adapter_dir)
    session = vlm.ChatSession(tuned, processor, settings=vlm.GenerationSettings(max_new_tokens=8))
    after = session.send("Describe the image in detail.", images=[image])
    assert after != before
    with tuned.disable_adapter():   # the same model without its adapter answers as the base did
        assert vlm.ask(tuned, processor, image, "Describe the image in detail.", max_new_tokens=8) == before
    loaded, processor = loading.load_llava("llava-1.6-mistral-7b", adapter=str(result.adapter_dir))
    assert vlm.ask(loaded, processor, image, "Describe the image in detail.", max_new_tokens=8) == after
    with pytest.raises(ValueError, match="adapter_config.json and adapter_model.safetensors"):
        llava.load_adapter(base, result.run_dir)
    pickled = result.run_dir / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((result.adapter_dir / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match="adapter_model.safetensors"):   # a pickle is never loaded
        llava.load_adapter(base, pickled)


def test_bad_input_is_named_before_training(tmp_path, trained):
    c, _ = trained
    with pytest.raises(FileNotFoundError, match="No instruction records"):
        llava.train_llava(config(tmp_path, "r", data=str(tmp_path / "none.jsonl")), progress=False)
    with pytest.raises(ValueError, match="trains only on a CUDA GPU"):
        llava.train_llava(config(tmp_path, "r", data=c.data, quantization="4bit"), progress=False)
    with pytest.raises(ValueError, match="Every training sample is longer than 20 tokens"):
        llava.train_llava(config(tmp_path, "r", data=c.data, max_tokens=20), progress=False)
    with pytest.raises(ValueError, match=r"rank=8 \(now 4\)"):
        llava.train_llava(config(tmp_path, "x", data=c.data, run_dir=c.run_dir, rank=4), progress=False)
    with pytest.raises(ValueError, match="`rank` must be a positive integer"):
        config(tmp_path, "r", data=c.data, rank=0)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match="line 1 is not a valid record"):
        llava.train_llava(config(tmp_path, "r", data=str(broken)), progress=False)


def test_config_file_and_cli(tmp_path, trained):
    c, result = trained
    path = llava.write_llava_config(c, tmp_path / "config.json")
    assert llava.read_llava_config(path) == c
    assert llava.read_llava_config(path, {"rank": "16"}).rank == 16
    with pytest.raises(ValueError, match="Unknown LlavaTrainConfig field"):
        llava.read_llava_config(path, {"ranks": 2})
    # a finished run: the CLI resumes it at its end and only writes the adapter again
    from helpers import cli

    assert cli.main(["train-llava", str(path)]) == 0   # python -m helpers train-llava RUN/config.json
    assert (result.run_dir / llava.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    questions = llava.held_out_questions(c)
    assert len(questions) == 2 and all(p.is_file() and q for p, q in questions)
