"""What the serving engine costs over bare batched forwards, at a fixed concurrency.

    python -m perf.engine_bench [--checkpoint DIR] [--concurrency 16] [--max-tokens 64] [--json out.json]

The same workload (N text prompts of mixed lengths, greedy, every request generating exactly
--max-tokens tokens) runs twice:
  engine: `LLMEngine` with everything on (scheduler, paged KV cache, prefix cache, sampler):
          add the N requests, step until done;
  bare:   the HF Qwen2-VL language model with a `DynamicCache`: one left-padded batch of N,
          one prefill forward and max_tokens - 1 decode forwards with argmax, no serving logic.
Prints generated tokens/s of both and engine / bare. Without --checkpoint it builds the tiny
random-weight checkpoint in a temporary directory. Each repetition uses fresh prompts, so the
prefix cache gets no hits it would not get in serving; the best repetition of each counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache, Qwen2VLForConditionalGeneration

from vlmserve.engine import LLMEngine, SamplingParams


def make_prompts(rng: np.random.Generator, count: int, min_len: int, max_len: int, vocab: int) -> list[np.ndarray]:
    return [rng.integers(0, vocab, int(rng.integers(min_len, max_len + 1))) for _ in range(count)]


def run_engine(engine: LLMEngine, prompts: list[np.ndarray], max_tokens: int, tag: str) -> tuple[float, list]:
    """Seconds to finish all prompts through the engine, and the tokens of each."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0)  # no stop ids: always max_tokens
    outputs: dict[str, list[int]] = {}
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        positions = np.broadcast_to(np.arange(len(ids)), (3, len(ids)))
        engine.add_request(f"{tag}-{i}", ids, positions, 0, None, sampling)
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out.token_id)
    seconds = time.perf_counter() - start
    return seconds, [outputs[f"{tag}-{i}"] for i in range(len(prompts))]


@torch.inference_mode()
def run_bare(model: Qwen2VLForConditionalGeneration, prompts: list[np.ndarray], max_tokens: int) -> tuple[float, list]:
    """Seconds for one padded batched prefill + max_tokens - 1 decode forwards, and the tokens."""
    text_model, lm_head = model.model.language_model, model.lm_head
    width = max(len(ids) for ids in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, ids in enumerate(prompts):  # left padding, so every row's last token is at the end
        input_ids[row, width - len(ids):] = torch.from_numpy(ids)
        mask[row, width - len(ids):] = 1
    start = time.perf_counter()
    cache = DynamicCache(config=text_model.config)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    generated = []
    for _ in range(max_tokens):
        hidden = text_model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True).last_hidden_state
        input_ids = lm_head(hidden[:, -1]).argmax(-1, keepdim=True)
        generated.append(input_ids)
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
    seconds = time.perf_counter() - start
    return seconds, torch.cat(generated, dim=1).tolist()


def benchmark(checkpoint: Path, concurrency: int, max_tokens: int, min_len: int, max_len: int, repeats: int,
              seed: int = 0) -> dict:
    engine = LLMEngine(checkpoint, max_num_seqs=max(concurrency, 1))
    model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    vocab = engine.config.vision_start_token_id  # below the vision special tokens: plain text
    rng = np.random.default_rng(seed)
    warmup = make_prompts(rng, concurrency, min_len, max_len, vocab)
    run_engine(engine, warmup, 4, "warmup")
    run_bare(model, warmup, 4)
    engine_s, bare_s, same = [], [], 0
    for repeat in range(repeats):
        prompts = make_prompts(rng, concurrency, min_len, max_len, vocab)
        seconds, engine_tokens = run_engine(engine, prompts, max_tokens, f"run{repeat}")
        engine_s.append(seconds)
        seconds, bare_tokens = run_bare(model, prompts, max_tokens)
        bare_s.append(seconds)
        same += sum(a == b for a, b in zip(engine_tokens, bare_tokens))
    tokens = concurrency * max_tokens
    engine_tps, bare_tps = tokens / min(engine_s), tokens / min(bare_s)
    return {
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "prompt_len_range": [min_len, max_len],
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "engine_tokens_per_s": engine_tps,
        "bare_tokens_per_s": bare_tps,
        "ratio": engine_tps / bare_tps,
        "engine_steps": engine.stats.steps,
        "engine_max_batch_size": engine.stats.max_batch_size,
        "requests_with_identical_output": f"{same}/{concurrency * repeats}",
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="default: build the tiny checkpoint in a temp dir")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--min-prompt-len", type=int, default=8)
    parser.add_argument("--max-prompt-len", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the tiny model is fastest on 1)")
    parser.add_argument("--json", help="write the figures here ('-': print them as JSON instead)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from export.tiny_model import build_tiny_checkpoint

            checkpoint = build_tiny_checkpoint(Path(tmp) / "tiny-qwen2-vl")
        result = benchmark(checkpoint, args.concurrency, args.max_tokens, args.min_prompt_len,
                           args.max_prompt_len, args.repeats)
    if args.json == "-":
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        for key, value in result.items():
            print(f"{key:>32}: {value:.3f}" if isinstance(value, float) else f"{key:>32}: {value}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
