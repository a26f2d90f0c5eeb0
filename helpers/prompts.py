"""Prompts in A1111's syntax: their weights read, rewritten in compel's syntax, and turned into pipeline embeddings.

A1111's attention syntax: `(word)` x1.1, `((word))` x1.21, `(word:1.3)` x1.3, `[word]` /1.1; nesting multiplies;
`\\(` `\\)` `\\[` `\\]` are literal brackets; unclosed brackets weigh everything after them, as in A1111.
`BREAK` starts a new 77-token chunk, as in A1111 (`split_break`; `encode` pads each part to 77 tokens).
Also A1111's other prompt syntax: `<lora:NAME:W>` / `<lyco:NAME:W>` tags (`extract_loras`: taken out of the text),
prompt editing `[from:to:when]` and alternation `[a|b]` (`schedule`: the text of each step); `AND` (composable
diffusion) is refused (`check_syntax`).

    parse_weights("a (red:1.3) car")   -> [("a ", 1.0), ("red", 1.3), (" car", 1.0)]
    to_compel("a (red car:1.3)")      -> "a (red car)1.3"
    pipe(**encode(pipe, "a (red car:1.3)", "blurry"), num_inference_steps=25)

`encode` weights tokens with compel (https://github.com/damian0815/compel) for SD 1.x and SDXL, and never truncates:
prompts longer than 77 tokens are encoded in 77-token chunks and the negative is padded to the same length. Weights
follow compel's semantics (above 1: scaled away from the empty prompt; below 1: blended towards the prompt without
those words), not A1111's, so the same seed gives a similar, not the same, image as A1111.
"""
import re
import unicodedata
from decimal import Decimal

ROUND = 1.1          # (word)
SQUARE = 1 / 1.1     # [word]

# One token of A1111's attention syntax; every character of a prompt belongs to exactly one token.
_TOKEN = re.compile(r"""
    \\[()\[\]\\]                          # an escaped bracket or backslash: that character, literally
  | \\                                    # a lone backslash: dropped (as A1111 does)
  | [(\[]                                 # an opening bracket
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)      # ":1.3)": an explicit weight that closes a round bracket
  | [)\]]                                 # a closing bracket
  | [^\\()\[\]:]+                         # plain text
  | :                                     # a colon that starts no weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

# compel's grammar (compel/prompt_parser.py, 2.5.x): these characters are syntax.
_COMPEL_SYNTAX = set('()",.+-=')
# compel operators that take the next "(...)" as their argument, even across spaces: "x.swap (y)1.1" is a swap.
_COMPEL_OPERATOR_END = re.compile(r"(\.swap|\.attend|withLora|useLora)$")


def is_blank(text: str) -> bool:
    """Whether `text` has nothing to read: only spaces and invisible characters (NUL and other control characters,
    zero-width spaces and joiners U+200B-U+200D, U+2060, the BOM U+FEFF, soft hyphens: Unicode's Cc and Cf)."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


def check_prompt(prompt, name: str = "prompt") -> None:
    """Raise ValueError where `prompt` is not a string with something visible in it (see is_blank)."""
    if not isinstance(prompt, str) or is_blank(prompt):
        raise ValueError(f"`{name}` must be a non-empty string, not {prompt!r}: describe the image you want.")


def parse_weights(prompt: str) -> list[tuple[str, float]]:
    """The (text, weight) chunks of an A1111 prompt, as A1111's `parse_prompt_attention` reads them: adjacent chunks
    of equal weight merged, text kept as written (spaces included). Differences from A1111: BREAK is removed
    (A1111 keeps it as a chunk marker; see split_break), chunks with no text are dropped, and a weight that is not a
    number (`(a:1.2.3)`) is read as text instead of raising. The empty prompt gives [("", 1.0)]."""
    return [chunk for chunk in _parse(prompt, breaks=False)]


def split_break(prompt: str) -> list[list[tuple[str, float]]]:
    """The weighted chunks of each BREAK-separated part of `prompt` (A1111: each part starts a new 77-token chunk);
    one part where there is no BREAK."""
    parts = [[]]
    for text, weight in _parse(prompt, breaks=True):
        if text is None:
            parts.append([])
        else:
            parts[-1].append((text, weight))
    parts = [part for part in parts if any(text.strip() for text, _ in part)]  # BREAK at an end adds no chunk
    return parts or [[("", 1.0)]]


def _parse(prompt: str, breaks: bool) -> list[tuple[str | None, float]]:
    """parse_weights; with `breaks`, each BREAK is a (None, 1.0) marker instead of a space."""
    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a str, not {type(prompt).__name__}.")
    chunks: list[list] = []                 # [text, weight], weights multiplied in place as brackets close
    round_open: list[int] = []              # index of the first chunk inside each open bracket
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for chunk in chunks[start:]:
            chunk[1] *= factor

    pos = 0
    while pos < len(prompt):
        match = _TOKEN.match(prompt, pos)
        token, pos = match.group(0), match.end()
        weight = match.group("weight")
        if token.startswith("\\"):
            chunks.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(chunks))
        elif token == "[":
            square_open.append(len(chunks))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:              # "1.2.3": A1111 raises; read the colon as text and go on after it
                chunks.append([":", 1.0])
                pos = match.start() + 1
                continue
            scale(round_open.pop(), factor)
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        elif breaks and _BREAK.search(token):   # text holding BREAK: the text around each, and a marker
            for i, part in enumerate(_BREAK.split(token)):
                chunks += [[None, 1.0]] * (i > 0) + [[part, 1.0]]
        else:                               # text, and brackets or weights that close nothing
            chunks.append([_BREAK.sub(" ", token), 1.0])
    for start in round_open:                # unclosed brackets weigh everything after them
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)

    merged: list[list] = []
    for text, weight in chunks:
        if text is None:                    # a BREAK marker: never merged
            merged.append([None, 1.0])
            continue
        if not text:
            continue
        if merged and merged[-1][0] is not None and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


def has_weighting(prompt: str) -> bool:
    """Whether A1111 would read `prompt` differently from its plain text: weights, escapes or BREAK. False for plain
    prompts, which the pipeline can take as they are (unless longer than 77 tokens, which it would cut off)."""
    return parse_weights(prompt) != [(prompt, 1.0)]


def _number(weight: float) -> str:
    """A weight as compel reads it back exactly: positional decimal digits (compel reads no exponent)."""
    return format(Decimal(repr(float(weight))), "f")


def _ordinary(char: str | None) -> bool:
    """Whether a `+` or `-` followed by `char` is text to compel (else it is read as an attention suffix)."""
    return char is not None and not char.isspace() and char not in _COMPEL_SYNTAX


def _escape(text: str, inside: bool) -> str:
    """`text` in compel's syntax, inside a weighted `(...)` group or at the top level.

    compel unescapes `\\(`, `\\)` and `\\"`; its other escapes (`\\+`, `\\-`, `\\=`) keep the backslash in the text,
    so they are used only where compel would misread the character: a `+`/`-` not followed by an ordinary character
    (`word-`, `a - b` inside a group, `a--b`), and `=` inside a group."""
    out = []
    for i, char in enumerate(text):
        after = text[i + 1] if i + 1 < len(text) else None
        before = text[i - 1] if i else None
        if char in '()"':
            out.append("\\" + char)
        elif char in "+-" and not _ordinary(after) and before != "\\" and (
                inside or (before is not None and not before.isspace())):
            # at the top level a +/- that starts a word is plain text to compel; after a character it is a suffix
            out.append("\\" + char)
        elif char == "=" and inside and before != "\\":
            out.append("\\=")
        else:
            out.append(char)
    escaped = "".join(out).strip()
    return escaped + " " if inside and escaped.endswith("\\") else escaped  # "a\" before ")" would escape it


def to_compel(prompt: str) -> str:
    """An A1111 prompt in compel's syntax: `"a (red car:1.3), [blurry]"` -> `"a (red car)1.3 , (blurry)0.9090..."`.

    Built from parse_weights, so compel's parser (`compel.PromptParser`) reads back the same weights. compel drops
    or adds spaces between words and around commas (the tokens CLIP sees are the same); where a `+`, `-` or `=` has
    to be escaped (see `_escape`) compel keeps a backslash in the text. Negative weights raise ValueError: compel
    cannot write them."""
    chunks = [(text, weight) for text, weight in parse_weights(prompt) if text.strip()]
    parts = []
    for i, (text, weight) in enumerate(chunks):
        if weight < 0:
            raise ValueError(f"compel cannot apply the negative weight {weight:g} of {text!r} in `prompt` {prompt!r}: "
                             "use a weight from 0 (removes it) upwards, or move the words to the negative prompt.")
        plain = _escape(text, inside=False)
        if weight == 1.0 and not (i + 1 < len(chunks) and _COMPEL_OPERATOR_END.search(plain)):
            parts.append(plain)
        else:  # a weighted group; also plain text that would make compel read the next group as an operator's argument
            parts.append(f"({_escape(text, inside=True)}){_number(weight)}")
    return " ".join(parts)


# --- A1111's extra syntax: LoRA tags, AND, prompt editing and alternation --------------------------------------

_LORA_TAG = re.compile(r"<(lora|lyco):([^:>]+)(?::([^:>]*))?(?::([^>]*))?>", re.I)
_AND = re.compile(r"\bAND\b")
_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)\s*")


def extract_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(`prompt` without its `<lora:NAME:W>` / `<lyco:NAME:W>` tags, [(NAME, W), ...]) as A1111's extra networks
    read them: W defaults to 1; a second weight (A1111's separate UNet weight, `<lora:NAME:TE:UNET>`) is read as
    the weight when given (diffusers applies one scale). A weight that is not a number raises ValueError."""
    found = []

    def take(match):
        name, weights = match.group(2).strip(), [w for w in match.groups()[2:] if w not in (None, "")]
        try:
            weight = float(weights[-1]) if weights else 1.0
        except ValueError:
            raise ValueError(f"The weight in {match.group(0)!r} is not a number: write it as <lora:{name}:0.8>.") \
                from None
        found.append((name, weight))
        return ""

    return _LORA_TAG.sub(take, prompt), found


def check_syntax(prompt: str, name: str = "prompt") -> None:
    """Raise ValueError for A1111 syntax this kit cannot run: AND (composable diffusion)."""
    if _AND.search(prompt):
        raise ValueError(f"`{name}` uses AND (A1111's composable diffusion), which this kit does not run: write "
                         "one prompt (join the parts with a comma), or use prompt editing [a:b:0.5] / [a|b].")


def _parse_edit(text: str, i: int, inside: bool):
    """Nodes of `text` from `i` up to an unmatched `]`, `:` or `|` (when `inside` brackets) or the end: strings, and
    ("edit", before, after, when) / ("alt", options) / ("plain", parts, separators) for square brackets."""
    nodes, buffer, depth = [], [], 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            buffer.append(text[i:i + 2])
            i += 2
            continue
        if char == "[":
            nodes.append("".join(buffer))
            buffer = []
            node, i = _parse_bracket(text, i + 1)
            nodes.append(node)
            continue
        if inside and depth == 0 and char in "]:|":
            break
        depth += (char == "(") - (char == ")" and depth > 0)
        buffer.append(char)
        i += 1
    nodes.append("".join(buffer))
    return [n for n in nodes if n != ""], i


def _parse_bracket(text: str, i: int):
    parts, separators = [], []
    while True:
        nodes, i = _parse_edit(text, i, inside=True)
        parts.append(nodes)
        if i >= len(text):                  # unclosed: plain text (read later as A1111's unclosed [ weighting)
            return ("plain", parts, separators, False), i
        char, i = text[i], i + 1
        if char == "]":
            break
        separators.append(char)
    if separators and set(separators) == {"|"}:
        return ("alt", parts), i
    if separators and set(separators) == {":"} and len(parts) in (2, 3) and len(parts[-1]) == 1 \
            and isinstance(parts[-1][0], str) and _NUMBER.fullmatch(parts[-1][0]):
        before, after = (parts[0], parts[1]) if len(parts) == 3 else ([], parts[0])
        return ("edit", before, after, float(parts[-1][0])), i
    return ("plain", parts, separators, True), i


def _render(nodes, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "edit":
            when = node[3] * steps if node[3] < 1 else node[3]   # A1111: below 1 a fraction of the steps
            out.append(_render(node[1] if step <= int(when) else node[2], step, steps))
        elif node[0] == "alt":
            out.append(_render(node[1][(step - 1) % len(node[1])], step, steps))
        else:
            _, parts, separators, closed = node
            inner = "".join(_render(part, step, steps) + (separators[k] if k < len(separators) else "")
                            for k, part in enumerate(parts))
            out.append("[" + inner + ("]" if closed else ""))
    return "".join(out)


def _has_edits(nodes) -> bool:
    return any(not isinstance(n, str) and (n[0] in ("edit", "alt") or any(_has_edits(p) for p in n[1]))
               for n in nodes)


def schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """A1111's prompt editing and alternation: [(last step, text for the steps up to it), ...], steps counted from
    1. `[from:to:when]` paints `from` up to step `when` (below 1: that fraction of `steps`), then `to`; `[to:when]`
    adds, `[from::when]` removes; `[a|b]` alternates every step. Other square brackets stay (A1111's weighting).
    A prompt with none of these gives [(steps, prompt)]."""
    nodes, _ = _parse_edit(prompt, 0, inside=False)
    if not _has_edits(nodes):
        return [(steps, prompt)]
    texts = [_render(nodes, step, steps) for step in range(1, steps + 1)]
    result = []
    for step, text in enumerate(texts, start=1):
        if result and result[-1][1] == text:
            result[-1] = (step, text)
        else:
            result.append((step, text))
    return result


# --- embeddings -------------------------------------------------------------------------------------------------

def _family(pipe) -> str:
    """"sd15" (SD 1.x/2.x: one CLIP) or "sdxl" (two CLIPs, pooled); ValueError for anything else."""
    name = type(pipe).__name__
    if (getattr(pipe, "transformer", None) is not None or getattr(pipe, "text_encoder_3", None) is not None
            or "Flux" in name or "StableDiffusion3" in name):
        raise ValueError(f"Prompt weighting (compel) is only for SD 1.x and SDXL pipelines, not {name}: pass the plain "
                         "prompt instead, pipe(prompt=..., negative_prompt=...) (FLUX takes no negative prompt); "
                         "A1111 weights like (word:1.3) would be read as text.")
    if getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "tokenizer_2", None) is not None:
        return "sdxl"
    if getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None:
        return "sd15"
    raise ValueError(f"`pipe` must be a Stable Diffusion 1.x or SDXL pipeline with its tokenizer and text encoder, "
                     f"not {name}.")


def _embeddings_type(family: str, clip_skip: int):
    """compel's ReturnedEmbeddingsType for A1111's "Clip skip" (0 or 1: no skip; 2: the penultimate layer)."""
    from compel import ReturnedEmbeddingsType

    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0:
        raise ValueError(f"`clip_skip` must be an integer, A1111's Clip skip: 1 (or 0) for the last CLIP layer, 2 for "
                         f"the one before; not {clip_skip!r}.")
    if family == "sdxl":
        if clip_skip > 1:
            raise ValueError(f"`clip_skip`={clip_skip} is not supported for SDXL with prompt weighting: SDXL already "
                             "uses the penultimate layer of its text encoders (as A1111 does), and compel 2.5 returns "
                             "no earlier one. Use clip_skip=1, or pass the plain prompt with the pipeline's own "
                             "clip_skip.")
        return ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
    if clip_skip > 2:
        raise NotImplementedError(
            f"`clip_skip`={clip_skip}: compel 2.5 returns only the last CLIP layer (Clip skip 1) or the penultimate "
            f"one (Clip skip 2). Use 1 or 2, or pass the plain prompt with pipe(..., clip_skip={clip_skip - 1}) "
            "(diffusers counts the layers skipped).")
    return (ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED if clip_skip == 2
            else ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED)


class _TextModelView:
    """A text encoder as compel's clip skip expects it: compel reads `text_encoder.text_model.final_layer_norm`, the
    transformers 4 layout; transformers 5's CLIPTextModel has `final_layer_norm` directly and no `text_model`."""

    def __init__(self, encoder):
        self._encoder = encoder
        self.text_model = encoder

    def __call__(self, *args, **kwargs):
        return self._encoder(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._encoder, name)


def _as_list(value, name: str, count: int | None = None) -> list[str]:
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if values is None or not all(isinstance(v, str) for v in values) or not values:
        raise ValueError(f"`{name}` must be a string or a non-empty list of strings, not {value!r}.")
    if count is not None and len(values) != count:
        if len(values) != 1:
            raise ValueError(f"`{name}` has {len(values)} entries but `prompt` has {count}: give one, or as many.")
        values = values * count
    return values


def _chunks(pipe, prompt: str, tokenizer, part: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The chunks of one BREAK-part of `prompt`, those of no text dropped (compel cannot place them) and
    textual-inversion tokens of several vectors expanded for this tokenizer (diffusers' maybe_convert_prompt:
    "<tok>" -> "<tok> <tok>_1 ...")."""
    chunks = []
    for text, weight in part:
        if weight < 0:
            raise ValueError(f"compel cannot apply the negative weight {weight:g} of {text!r} in {prompt!r}: use a "
                             "weight from 0 (removes the words) upwards, or move them to the negative prompt.")
        if text.strip():
            if hasattr(pipe, "maybe_convert_prompt"):
                text = pipe.maybe_convert_prompt(text, tokenizer)
            chunks.append((text, weight))
    return chunks or [("", 1.0)]


def _conditioning(pipe, compel, prompt: str, tokenizer):
    """compel's embedding of `prompt`: each BREAK-part padded to its own multiple of 77 tokens, then joined."""
    import torch
    from compel.prompt_parser import Conjunction, FlattenedPrompt

    parts = [compel.build_conditioning_tensor_for_conjunction(
        Conjunction([FlattenedPrompt(_chunks(pipe, prompt, tokenizer, part))]))[0] for part in split_break(prompt)]
    return torch.cat(parts, dim=1)


def _pad(compel, tensors: list, length: int) -> list:
    """`tensors` padded with compel's empty-prompt embedding to `length` tokens (a multiple of 77)."""
    template = tensors[0].new_zeros((1, length, tensors[0].shape[-1]))
    return compel.pad_conditioning_tensors_to_same_length(list(tensors) + [template])[:-1]


def encode(pipe, prompt, negative_prompt="", clip_skip: int = 0) -> dict:
    """Keyword arguments for `pipe(...)` that carry the A1111-weighted prompt and negative prompt as embeddings:
    `prompt_embeds` and `negative_prompt_embeds`, for SDXL also `pooled_prompt_embeds` and
    `negative_pooled_prompt_embeds`. Nothing is truncated: a long prompt gives 154, 231, ... tokens and the negative
    is padded to match. `prompt` is a string (the pipeline's num_images_per_prompt makes the copies) or a list of
    them (a batch; `negative_prompt` one string or as many). `clip_skip` is A1111's: 0 or 1 the last CLIP layer, 2 the
    penultimate (SD 1.x only). An empty SDXL negative gives zeros, as diffusers and A1111 do. SD3 and FLUX: ValueError
    (pass the plain prompt)."""
    family = _family(pipe)
    embeddings_type = _embeddings_type(family, clip_skip)
    prompts = _as_list(prompt, "prompt")
    negatives = _as_list(negative_prompt, "negative_prompt", count=len(prompts))
    import torch
    from compel import Compel

    pairs = [(pipe.tokenizer, pipe.text_encoder), (getattr(pipe, "tokenizer_2", None),
                                                   getattr(pipe, "text_encoder_2", None))]
    pairs = [(tok, enc) for tok, enc in pairs if tok is not None and enc is not None]
    device = getattr(pipe, "_execution_device", None) or pairs[0][1].device
    texts = prompts + negatives
    per_encoder, pooled = [], None
    with torch.no_grad():
        for i, (tokenizer, text_encoder) in enumerate(pairs):
            wants_pooled = family == "sdxl" and i == len(pairs) - 1   # SDXL's pooled output is the last encoder's
            if embeddings_type.name == "PENULTIMATE_HIDDEN_STATES_NORMALIZED" and not hasattr(text_encoder,
                                                                                               "text_model"):
                text_encoder = _TextModelView(text_encoder)
            compel = Compel(tokenizer=tokenizer, text_encoder=text_encoder, truncate_long_prompts=False,
                            returned_embeddings_type=embeddings_type, requires_pooled=wants_pooled, device=device)
            conditionings = [_conditioning(pipe, compel, text, tokenizer) for text in texts]
            per_encoder.append((compel, conditionings))
            if wants_pooled:  # from the plain text, syntax removed (compel's own pooling would read "(a)1.3" as text)
                plain = ["".join(t for t, _ in parse_weights(text)) for text in texts]
                if hasattr(pipe, "maybe_convert_prompt"):
                    plain = [pipe.maybe_convert_prompt(text, tokenizer) for text in plain]
                pooled = compel.conditioning_provider.get_pooled_embeddings(plain, device=compel.device)
        length = max(c.shape[1] for _, conds in per_encoder for c in conds)
        padded = [_pad(compel, conds, length) for compel, conds in per_encoder]
        embeds = torch.cat([torch.cat(conds, dim=0) for conds in padded], dim=-1)   # SDXL: 768 + 1280 wide
    n = len(prompts)
    result = {"prompt_embeds": embeds[:n], "negative_prompt_embeds": embeds[n:]}
    if family == "sdxl":
        result.update(pooled_prompt_embeds=pooled[:n], negative_pooled_prompt_embeds=pooled[n:])
        if all(not neg.strip() for neg in negatives) and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            result["negative_prompt_embeds"] = torch.zeros_like(result["negative_prompt_embeds"])
            result["negative_pooled_prompt_embeds"] = torch.zeros_like(result["negative_pooled_prompt_embeds"])
    return result
