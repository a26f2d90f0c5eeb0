"""LLaVA: questions about an image. (Chat sessions, captioning and reasoning build on `ask`.)"""
from . import smoke


def ask(model, processor, image, question: str, max_new_tokens: int = 128, **generate_kwargs) -> str:
    """LLaVA's answer to `question` about `image` (a PIL image), greedy unless sampling is asked for. The prompt is
    built with the checkpoint's own chat template, never by hand."""
    import torch

    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"`question` must be a non-empty string, not {question!r}.")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.strip()}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    generate_kwargs.setdefault("do_sample", False)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=smoke.cap("max_new_tokens", max_new_tokens),
                                **generate_kwargs)
    return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
