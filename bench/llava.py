"""LLaVA 1.6 speed and memory: load time, time to first token, decode tokens/s and peak memory, for one quantization.

    python bench/llava.py [--model llava-1.6-mistral-7b] [--quantization auto|4bit|8bit|none] [--new-tokens 128]
                          [--repeats 3] [--out bench/results/llava_cpu.md] [--append]

The model is loaded once (timed), then asked about one image of assets/vqa: one warm-up, then `--repeats` timed
generations of exactly `--new-tokens` tokens (min_new_tokens = max_new_tokens, greedy), streamed through
TextIteratorStreamer with model.generate in a thread; the medians are reported. Run one quantization a process (the
peak RSS of a process never goes down) and `--append` the next run's row to the same file.
"""
import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import helpers
from helpers.bench import command_line, machine, peak_rss_mib, versions
from helpers import loading, runtime, smoke

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "assets" / "vqa" / "images" / "bar_chart.png"
QUESTION = "Describe this chart in detail."
TINY_SENTENCE = "tiny random-weight model: these figures are the cost of the test path, not LLaVA's speed"
HEADER = "| model | quantization | new tokens | prompt tokens | load s | first token s | decode tok/s | " \
         "RSS after load MiB | peak RSS MiB | peak CUDA MiB |"
MIB = 2**20




def generate_once(model, processor, image, new_tokens):
    """(seconds to the first new token, decode tokens/s, prompt tokens) of one streamed generation."""
    import torch
    from transformers import TextIteratorStreamer

    t0 = time.perf_counter()
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}

    def work():
        try:
            with torch.inference_mode():
                result["output"] = model.generate(**inputs, streamer=streamer, do_sample=False,
                                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        except BaseException as e:  # unblock the reader below, then raise in the main thread
            result["error"] = e
            streamer.end()

    thread = threading.Thread(target=work)
    thread.start()
    t_first = None
    for _ in streamer:  # one chunk a token (empty while a word is incomplete), the first as soon as it exists
        t_first = t_first or time.perf_counter()
    t_done = time.perf_counter()
    thread.join()
    if "error" in result:
        raise result["error"]
    prompt_tokens = inputs["input_ids"].shape[1]
    generated = result["output"].shape[1] - prompt_tokens
    if generated != new_tokens:
        raise RuntimeError(f"Asked for exactly {new_tokens} new tokens, got {generated}.")
    return t_first - t0, (generated - 1) / (t_done - t_first), prompt_tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-1.6-mistral-7b")
    parser.add_argument("--quantization", default="auto", choices=loading.QUANTIZATIONS)
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per answer (at least 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations after one warm-up")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "llava_cpu.md"))
    parser.add_argument("--append", action="store_true", help="add this run's row to --out instead of replacing it")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        raise ValueError(f"`--new-tokens` must be at least 2 (decode speed needs a second token), "
                         f"not {args.new_tokens}.")
    if args.repeats < 1:
        raise ValueError(f"`--repeats` must be at least 1, not {args.repeats}.")
    command = command_line("bench/llava.py", argv)
    runtime.quiet_logging()
    import psutil
    import torch
    from PIL import Image

    profile = runtime.detect_profile()
    cuda = profile.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    new_tokens = smoke.cap("max_new_tokens", args.new_tokens)
    resolved = helpers.resolve(args.model, task="vlm")  # in SMOKE MODE this builds the tiny model: not timed
    quantization = args.quantization if args.quantization != "auto" else \
        loading.choose_quantization(resolved, profile)
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration  # noqa: F401  (imports: not timed)
    if quantization in ("4bit", "8bit"):
        import bitsandbytes  # noqa: F401

    t0 = time.perf_counter()
    model, processor = helpers.load_llava(args.model, quantization=quantization, profile=profile)
    t_load = time.perf_counter() - t0
    rss_load = psutil.Process().memory_info().rss / MIB
    image = Image.open(IMAGE).convert("RGB")
    generate_once(model, processor, image, new_tokens)  # warm-up
    runs = [generate_once(model, processor, image, new_tokens) for _ in range(args.repeats)]
    ttft, tps = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    peak_cuda = torch.cuda.max_memory_allocated() / MIB if cuda else None
    machine_line = machine()
    library_versions = versions("torch", "transformers", "accelerate", "bitsandbytes")
    record = {"model": args.model, "quantization": quantization, "tiny": smoke.is_tiny(), "new_tokens": new_tokens,
              "asked_new_tokens": args.new_tokens, "prompt_tokens": runs[0][2], "repeats": args.repeats,
              "load_s": round(t_load, 3), "first_token_s": round(ttft, 4), "decode_tok_s": round(tps, 1),
              "rss_after_load_mib": round(rss_load), "peak_rss_mib": round(peak_rss_mib()),
              "peak_cuda_mib": None if peak_cuda is None else round(peak_cuda), "command": command,
              "machine": machine_line, "versions": library_versions}
    row = (f"| {args.model} | {quantization} | {new_tokens} | {runs[0][2]} | {t_load:.2f} | {ttft:.3f} | {tps:.1f} | "
           f"{rss_load:.0f} | {peak_rss_mib():.0f} | {'-' if peak_cuda is None else f'{peak_cuda:.0f}'} |")
    capped = (f" SMOKE MODE caps the work at {smoke.LIMITS['max_new_tokens']} new tokens "
              f"(asked: {args.new_tokens})." if new_tokens < args.new_tokens else "")
    out = Path(args.out)
    if args.append and out.is_file():
        lines = out.read_text().rstrip("\n").split("\n")
        last_row = max(i for i, line in enumerate(lines) if line.startswith("|"))
        lines.insert(last_row + 1, row)
        lines.append(f"    {json.dumps(record)}")
        text = "\n".join(lines) + "\n"
    else:
        text = "\n".join([
            "# LLaVA 1.6: load, first token, decode speed, peak memory",
            "",
            *([f"**{TINY_SENTENCE}.**", ""] if smoke.is_tiny() else []),
            f"Machine: {machine_line}; " + ", ".join(f"{d} {v}" for d, v in library_versions.items()) + ".",
            f"Work: `{IMAGE.relative_to(ROOT)}` and \"{QUESTION}\", greedy, exactly the new tokens shown "
            f"(min_new_tokens = max_new_tokens); the model loaded once (load s); first token s (image processing "
            f"included) and decode tok/s are medians of {args.repeats} runs after one warm-up.{capped} "
            "Peak RSS is the process's (ru_maxrss), so each row is its own process.",
            "",
            HEADER,
            "|---|---|---|---|---|---|---|---|---|---|",
            row,
            "",
            "Commands and results, one JSON object a run:",
            "",
            f"    {json.dumps(record)}",
            "",
        ])
    out.parent.mkdir(parents=True, exist_ok=True)
    helpers.atomic_write(out, text)
    print(text)
    return record


if __name__ == "__main__":
    main()
