"""helpers.prompts: A1111 weights, their compel form, and embeddings on the tiny SD 1.5 and SDXL pipelines."""
import re

import numpy as np
import pytest
import torch
from compel import PromptParser

from helpers import loading, prompts
from helpers.tiny import CLIP_WORDS

UP, DOWN = 1.1, 1 / 1.1

# (A1111 prompt, chunks as A1111's parse_prompt_attention gives them; the first five are its docstring's examples)
A1111 = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", UP), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", UP)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", UP)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * UP * UP), (" ", UP), ("on", 1.0), (" a ", UP), ("hill", 0.5 * UP),
      (", sun, ", UP), ("sky", UP ** 4), (".", UP)]),
    ("((word))", [("word", UP * UP)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("( word : 1.3 )", [(" word ", 1.3)]),
    ("(a:0.5)", [("a", 0.5)]),
    ("(a:.5)", [("a", 0.5)]),
    ("[word]", [("word", DOWN)]),
    ("[[x]]", [("x", DOWN * DOWN)]),
    ("((a:1.5) b:0.5)", [("a", 0.75), (" b", 0.5)]),
    ("[a (b:2)]", [("a ", DOWN), ("b", 2 * DOWN)]),
    ("(a", [("a", UP)]),
    ("x (a [b", [("x ", 1.0), ("a ", UP), ("b", UP * DOWN)]),
    ("a b)", [("a b)", 1.0)]),                       # a bracket that closes nothing is text
    ("a] b:", [("a] b:", 1.0)]),
    ("x :1.2) y", [("x :1.2) y", 1.0)]),             # a weight with no bracket open is text too
    ("(x:1)", [("x", 1.0)]),
    ("a (x:1) b", [("a x b", 1.0)]),                 # equal weights merge
    ("(x:1.2.3)", [("x:1.2.3", UP)]),                # not a number: text (A1111 raises)
    ("[x:1.2]", [("x:1.2", DOWN)]),                  # explicit weights are for round brackets only
    ("(a:-1)", [("a", -1.0)]),
    (r"\[x\] \(y\)", [("[x] (y)", 1.0)]),
    (r"(a\\)", [("a\\", UP)]),                       # an escaped backslash is a backslash
    (r"a\b", [("ab", 1.0)]),                         # a lone one is dropped, as in A1111
    ("a BREAK b", [("a b", 1.0)]),                   # BREAK is ignored (removed)
    ("(a BREAK b:1.2)", [("a b", 1.2)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", A1111)
def test_parse_weights_reads_a1111_syntax(prompt, expected):
    got = prompts.parse_weights(prompt)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected], rel=1e-12)


def test_parse_weights_multiplies_in_a1111_order():
    """Exactly A1111's floats (its docstring), so that parse results compare equal to A1111's."""
    got = dict(prompts.parse_weights("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert got["house"] == 1.5730000000000004 and got["sky"] == 1.4641000000000006 and got["hill"] == 0.55


@pytest.mark.parametrize("prompt, expected", [
    ("a photo of a cat", False), ("", False), ("a, b: c", False), ("a b)", False), ("a (b)", True), ("(a:1.0)", True),
    ("[a]", True), (r"\(x\)", True), ("a BREAK b", True)])
def test_has_weighting(prompt, expected):
    assert prompts.has_weighting(prompt) is expected


def test_parse_weights_refuses_what_is_not_a_string():
    with pytest.raises(TypeError, match="`prompt` must be a str, not list"):
        prompts.parse_weights(["a"])


# --- compel syntax ---------------------------------------------------------------------------------------------

def test_to_compel_examples():
    assert prompts.to_compel("a (red car:1.3)") == "a (red car)1.3"
    assert prompts.to_compel("plain words, nothing else") == "plain words, nothing else"
    assert prompts.to_compel("[[x]] (y:0.00001)") == f"(x){DOWN * DOWN!r} (y)0.00001"  # no exponent: compel reads none
    assert prompts.to_compel(r"\(x\)") == r"\(x\)"
    assert prompts.to_compel("") == ""


def _merged(chunks):
    """Chunks as CLIP sees them: whitespace-only chunks dropped, equal neighbours joined, spaces removed."""
    out = []
    for text, weight in chunks:
        if text.strip():
            if out and out[-1][1] == weight:
                out[-1][0] += " " + text
            else:
                out.append([text, weight])
    return [(re.sub(r"\s+", "", text), weight) for text, weight in out] or [("", 1.0)]


TRICKY = [
    "x.swap (y:1.2)", "(a, b).blend(1,2)", "withLora(foo:1.2)", "a.attend (1:1.2)", "cat++ (dog--:1.2) a--b x+",
    "well- (done-:1.2) a - b (c + d = e:1.3)", 'say "hi" (say "hi":1.1)', "(a:1.2)5 cats", "(x:1.2).and()",
    "(a,b.c:1.3), d.e", "useLora (x:0.8)", "(-:1.2) (+ =:1.1)",
]


@pytest.mark.parametrize("prompt", [p for p, chunks in A1111 if all(w >= 0 for _, w in chunks)] + TRICKY)
def test_to_compel_round_trips_through_compels_parser(prompt):
    conjunction = PromptParser().parse_conjunction(prompts.to_compel(prompt))
    assert len(conjunction.prompts) == 1 and conjunction.weights == [1.0] and not conjunction.lora_weights
    parsed = [(f.text, f.weight) for f in conjunction.prompts[0].children]
    # compel keeps the backslash of its \+ \- \= escapes in the text: the one place its text differs
    parsed = [(re.sub(r"\\(?=[+=-])", "", text), weight) for text, weight in parsed]
    assert _merged(parsed) == _merged(prompts.parse_weights(prompt))   # weights exactly equal


def test_to_compel_refuses_negative_weights():
    with pytest.raises(ValueError, match="negative weight -1 of 'a'"):
        prompts.to_compel("(a:-1)")


# --- embeddings ------------------------------------------------------------------------------------------------

def run(pipe, **kwargs):
    return pipe(**kwargs, num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator("cpu").manual_seed(0)).images


def close(a, b, tol=1e-5):
    return a.shape == b.shape and torch.allclose(a, b, atol=tol, rtol=0)


def test_plain_prompts_match_the_pipelines_own_encoding(sd, sdxl):
    got = prompts.encode(sd, "a photo of a cat", "blurry")
    embeds, negative = sd.encode_prompt("a photo of a cat", "cpu", 1, True, "blurry")
    assert close(got["prompt_embeds"], embeds) and close(got["negative_prompt_embeds"], negative)
    uncond, _ = sd.encode_prompt("", "cpu", 1, False)
    assert close(prompts.encode(sd, "")["prompt_embeds"], uncond)
    for negative_prompt in ("blurry", ""):      # "": zeros, as SDXL's force_zeros_for_empty_prompt does
        got = prompts.encode(sdxl, "a photo of a cat", negative_prompt)
        want = sdxl.encode_prompt("a photo of a cat", device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=True, negative_prompt=negative_prompt or None)
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        assert all(close(got[name], w) for name, w in zip(names, want)), negative_prompt
    assert prompts.encode(sdxl, "a cat")["negative_prompt_embeds"].abs().max() == 0


def test_encoded_kwargs_generate_images(sd, sdxl):
    kwargs = prompts.encode(sd, "a (red:1.3) car, [blurry] ((sunset))", "low quality")
    assert {k: tuple(v.shape) for k, v in kwargs.items()} == {"prompt_embeds": (1, 77, 32),
                                                             "negative_prompt_embeds": (1, 77, 32)}
    image = run(sd, **kwargs)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    kwargs = prompts.encode(sdxl, "a (red:1.3) car, [blurry]", "low quality")
    assert {k: tuple(v.shape) for k, v in kwargs.items()} == {
        "prompt_embeds": (1, 77, 64), "negative_prompt_embeds": (1, 77, 64),   # 32 (CLIP-L) + 32 (CLIP-G)
        "pooled_prompt_embeds": (1, 32), "negative_pooled_prompt_embeds": (1, 32)}
    image = run(sdxl, **kwargs)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_weight_one_is_the_plain_prompt_and_other_weights_are_not(family, request):
    pipe = request.getfixturevalue(family)
    plain = prompts.encode(pipe, "a photo of a cat", "blurry")["prompt_embeds"]
    ones = prompts.encode(pipe, "(a:1.0) (photo:1.0) (of:1.0) (a:1.0) (cat:1.0)", "blurry")["prompt_embeds"]
    assert close(ones, plain)
    weighted = prompts.encode(pipe, "a photo of a (cat:1.5)", "blurry")
    up = weighted["prompt_embeds"]
    changed = (up - plain).abs().amax(dim=-1)[0] > 1e-4
    assert changed.nonzero().flatten().tolist() == [5]       # <bos> a photo of a [cat]: that token only
    down = prompts.encode(pipe, "a photo of a (cat:0.5)", "blurry")["prompt_embeds"]
    assert not close(down, plain) and not close(down, up)
    if family == "sdxl":  # SDXL's pooled embedding comes from the text without syntax, unweighted (as in A1111)
        for other in ("a photo of a cat", "(a) (photo) of a [cat]"):
            assert close(weighted["pooled_prompt_embeds"], prompts.encode(pipe, other)["pooled_prompt_embeds"])


def test_long_prompts_are_not_truncated_and_the_negative_is_padded(sd):
    long = " ".join((CLIP_WORDS * 5)[:200])                          # words the tiny tokenizer has as one token
    assert len(sd.tokenizer(long).input_ids) == 200 + 2               # 200 tokens, plus <bos> and <eos>
    kwargs = prompts.encode(sd, long, "blurry")
    embeds, negative = kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"]
    assert embeds.shape == negative.shape == (1, 3 * 77, 32)
    alone, empty = prompts.encode(sd, "blurry")["prompt_embeds"], prompts.encode(sd, "")["prompt_embeds"]
    assert close(negative[:, :77], alone) and close(negative[:, 77:154], empty) and close(negative[:, 154:], empty)
    assert not close(embeds[:, 77:154], embeds[:, :77])                # the later chunks carry the rest of the text
    assert np.isfinite(run(sd, **kwargs)).all()
    short = prompts.encode(sd, "a cat", long)                          # a long negative pads the prompt instead
    assert short["prompt_embeds"].shape == short["negative_prompt_embeds"].shape == (1, 231, 32)


def test_a_list_of_prompts_is_a_batch(sd):
    kwargs = prompts.encode(sd, ["a (cat:1.2)", "a dog " * 40], "blurry")
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape == (2, 154, 32)
    assert close(kwargs["prompt_embeds"][:1, :77], prompts.encode(sd, "a (cat:1.2)")["prompt_embeds"])
    with pytest.raises(ValueError, match="`negative_prompt` has 3 entries but `prompt` has 2"):
        prompts.encode(sd, ["a", "b"], ["x", "y", "z"])


def test_clip_skip_follows_a1111(sd, sdxl):
    ids = sd.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = sd.text_encoder(ids, output_hidden_states=True)
        penultimate = sd.text_encoder.final_layer_norm(out.hidden_states[-2])
    assert close(prompts.encode(sd, "a photo of a cat", clip_skip=2)["prompt_embeds"], penultimate)
    for clip_skip in (0, 1):
        assert close(prompts.encode(sd, "a photo of a cat", clip_skip=clip_skip)["prompt_embeds"],
                     out.last_hidden_state)
    with pytest.raises(NotImplementedError, match="Clip skip 2"):
        prompts.encode(sd, "a cat", clip_skip=3)
    with pytest.raises(ValueError, match="not supported for SDXL"):
        prompts.encode(sdxl, "a cat", clip_skip=2)
    with pytest.raises(ValueError, match="`clip_skip` must be an integer"):
        prompts.encode(sd, "a cat", clip_skip=-1)


def test_multi_vector_textual_inversion_tokens_are_expanded():
    pipe = loading.load_sd("sd15")
    pipe.load_textual_inversion({"<x>": torch.randn(3, 32, generator=torch.Generator().manual_seed(0))}, token="<x>")
    embeds, _ = pipe.encode_prompt("a photo of <x>", "cpu", 1, False)
    assert close(prompts.encode(pipe, "a photo of <x>")["prompt_embeds"], embeds)
    weighted = prompts.encode(pipe, "a photo of (<x>:1.3)")["prompt_embeds"]
    assert ((weighted - embeds).abs().amax(dim=-1)[0] > 1e-4).nonzero().flatten().tolist() == [4, 5, 6]


@pytest.mark.parametrize("name", ["sd3-medium", "flux-schnell"])
def test_sd3_and_flux_are_refused(name):
    with pytest.raises(ValueError, match="only for SD 1.x and SDXL pipelines.*pass the plain prompt"):
        prompts.encode(loading.load_sd(name), "a (cat:1.2)")


# --- A1111's extra syntax: prompt editing, alternation, BREAK, AND, LoRA tags ----------------------------------

@pytest.mark.parametrize("prompt, steps, expected", [
    ("a [cat:dog:0.5] here", 6, [(3, "a cat here"), (6, "a dog here")]),      # below 1: a fraction of the steps
    ("a [cat:dog:2]", 6, [(2, "a cat"), (6, "a dog")]),                      # from 1: a step number
    ("[a:b:2.5]", 20, [(2, "a"), (20, "b")]),
    ("[a:b:25]", 20, [(20, "a")]),
    ("[to:2]", 4, [(2, ""), (4, "to")]), ("[from::2]", 4, [(2, "from"), (4, "")]),
    ("[a|b] x", 4, [(1, "a x"), (2, "b x"), (3, "a x"), (4, "b x")]),
    ("[a|b|c]", 3, [(1, "a"), (2, "b"), (3, "c")]),
    ("[[a|b]:c:0.5]", 4, [(1, "a"), (2, "b"), (4, "c")]),
    ("[a:(red:1.2):3]", 4, [(3, "a"), (4, "(red:1.2)")]),                    # a colon inside ( ) is its weight
    ("a [word] (x:1.2)", 4, [(4, "a [word] (x:1.2)")]),                       # A1111's [ ] weighting stays
    ("[unclosed", 4, [(4, "[unclosed")]), ("a ] b [", 4, [(4, "a ] b [")]),
    ("[x:y:z:0.5]", 4, [(4, "[x:y:z:0.5]")]), (r"\[a:b:0.5\]", 4, [(4, r"\[a:b:0.5\]")]),
])
def test_schedule_reads_prompt_editing_and_alternation_as_a1111_documents(prompt, steps, expected):
    assert prompts.schedule(prompt, steps) == expected


def test_split_break_gives_the_parts_and_keeps_their_weights():
    assert prompts.split_break("a BREAK (b:1.2) c BREAK") == [[("a", 1.0)], [("b", 1.2), (" c", 1.0)]]
    assert prompts.split_break("no break here") == [[("no break here", 1.0)]]
    assert prompts.parse_weights("a BREAK b") == [("a b", 1.0)]


def test_and_is_refused_but_and_in_a_word_is_text():
    with pytest.raises(ValueError, match=r"`negative_prompt` uses AND"):
        prompts.check_syntax("x AND y", "negative_prompt")
    prompts.check_syntax("sand and ANDROID, Andy")


@pytest.mark.parametrize("prompt, text, tags", [
    ("a <lora:add_detail:0.8> cat", "a  cat", [("add_detail", 0.8)]),
    ("<lora:x>", "", [("x", 1.0)]), ("<LoRA:x:1.5>", "", [("x", 1.5)]), ("<lyco:y:0.5:0.7>", "", [("y", 0.7)]),
    ("no tags <not:a:tag>", "no tags <not:a:tag>", [])])
def test_extract_loras(prompt, text, tags):
    assert prompts.extract_loras(prompt) == (text, tags)
