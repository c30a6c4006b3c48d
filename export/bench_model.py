"""Build the `bench` random-weight Qwen2-VL checkpoint: Qwen2-VL's proportions at a size a CPU serves.

``python -m export.bench_model OUT_DIR [--seed 0] [--shape bench|2b] [--check]`` writes a checkpoint
laid out like Qwen2-VL-2B-Instruct, with the tokenizer, chat template and processor configs of
``export.tiny_model`` (so the same preprocessing and token ids) and, for the default ``bench`` shape,
these sizes:

* LLM: hidden 512, 8 layers, 8 query heads of 64 with 2 KV heads (GQA 4:1), MLP 2816 (5.5x, as
  Qwen2-VL's 5.3-5.8x), M-RoPE sections [8, 12, 12] (Qwen2-VL's [16, 24, 24] for head_dim 128, halved).
* ViT: embed 256, depth 8, 4 heads of 64, MLP ratio 4, merger into the LLM's 512.

``--shape 2b`` has Qwen2-VL-2B-Instruct's own sizes (LLM hidden 1536, 28 layers, vocabulary 151,936
with tied embeddings, bfloat16; ViT 1280 wide and 32 deep, over ONNX's 2 GB in float32): the
checkpoint for measuring start-up and memory at real proportions (perf/startup_bench.py), too slow
on a CPU for the serving benchmarks.

The benchmarks compare the greedy answers of two servers token for token, which is only a check
when the answers carry information. Random weights at the usual init fall into repeating one
token, and byte-level tokens can end an answer in the middle of a UTF-8 character, which servers
stream differently. So the weights are shaped:

* the LLM's ``q_proj`` and ``k_proj`` are scaled by ``ATTENTION_SHARPNESS``: at the usual init,
  attention is near uniform, every position sees the average of its context, that average barely
  moves from one token to the next and greedy output repeats one token (distinct tokens / length
  0.07 over six prompts). With attention logits 64x larger each head attends to a few positions
  picked by content and relative position, and the output keeps changing (0.94).
* ``lm_head`` is scaled by ``tiny_model.LM_HEAD_SCALE`` (clear-cut greedy picks), and the rows of
  special tokens other than EOS and of tokens that are no complete UTF-8 text on their own are
  zeroed: logit 0 lies far below the top logits, so greedy never picks them.

``--check`` prints the greedy variety of the built model (``greedy_variety``). The build is
deterministic for a seed.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import transformers
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from export.tiny_model import (
    EOS_TOKENS,
    LM_HEAD_SCALE,
    SPECIAL_TOKENS,
    build_config,
    build_tokenizer,
    save_checkpoint,
)

TEXT_CONFIG = {
    "hidden_size": 512,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 32768,
    "max_window_layers": 8,
    "rope_parameters": {"rope_type": "default", "type": "mrope", "mrope_section": [8, 12, 12],
                        "rope_theta": 1000000.0},
}
VISION_CONFIG = {"embed_dim": 256, "depth": 8, "num_heads": 4, "mlp_ratio": 4, "hidden_size": 512}
# Qwen2-VL-2B-Instruct's config.json, the sizes only.
QWEN2_VL_2B_TEXT = {
    **TEXT_CONFIG, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "head_dim": 128, "max_window_layers": 28,
    "vocab_size": 151936,
    "rope_parameters": {**TEXT_CONFIG["rope_parameters"], "mrope_section": [16, 24, 24]},
}
QWEN2_VL_2B_VISION = {"embed_dim": 1280, "depth": 32, "num_heads": 16, "mlp_ratio": 4, "hidden_size": 1536}
ATTENTION_SHARPNESS = 8.0
CHECK_PROMPTS = (
    "Describe this image.",
    "What color is the car?",
    "How many animals are there in the park near the river?",
    "Where was this photo taken?",
    "The red dog runs across the street.",
    "Summarize the video in one sentence.",
)


@dataclass(frozen=True)
class Shape:
    """Sizes of a checkpoint (overrides of the tiny config's text and vision parts) and how it is stored."""

    text: Mapping = field(default_factory=lambda: TEXT_CONFIG)
    vision: Mapping = field(default_factory=lambda: VISION_CONFIG)
    tie_word_embeddings: bool = False
    dtype: torch.dtype = torch.float32


SHAPES = {
    "bench": Shape(),
    # bfloat16 as the published checkpoint; building in it also halves the build's memory (about 4.4 GB).
    "2b": Shape(QWEN2_VL_2B_TEXT, QWEN2_VL_2B_VISION, tie_word_embeddings=True, dtype=torch.bfloat16),
}


def build_bench_config(tokenizer: Qwen2Tokenizer, shape: Shape = SHAPES["bench"]) -> Qwen2VLConfig:
    """The tiny checkpoint's config (token ids, activations, patching) with the sizes of `shape`."""
    config = build_config(tokenizer).to_dict()
    # layer_types is derived from the layer count; dropping it lets the new count derive it again.
    text_config = {k: v for k, v in config["text_config"].items() if k != "layer_types"}
    config.update(text_config={**text_config, **shape.text}, vision_config={**config["vision_config"], **shape.vision},
                  tie_word_embeddings=shape.tie_word_embeddings)
    return Qwen2VLConfig.from_dict(config)


def never_generated_ids(tokenizer: Qwen2Tokenizer) -> list[int]:
    """Special tokens other than EOS, and tokens whose bytes alone are an incomplete UTF-8 sequence."""
    special = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS if t not in EOS_TOKENS]
    # The corpus holds no U+FFFD, so a replacement character can only come from undecodable bytes.
    partial = [i for i in range(tokenizer.vocab_size) if "\ufffd" in tokenizer.decode([i])]
    return special + partial


def build_bench_model(tokenizer: Qwen2Tokenizer, seed: int,
                      shape: Shape = SHAPES["bench"]) -> Qwen2VLForConditionalGeneration:
    """Seeded random weights, shaped as the module docstring says."""
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(shape.dtype)
    try:
        model = Qwen2VLForConditionalGeneration(build_bench_config(tokenizer, shape)).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.mul_(ATTENTION_SHARPNESS)
                projection.bias.mul_(ATTENTION_SHARPNESS)
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
        model.lm_head.weight[never_generated_ids(tokenizer)] = 0.0
        model.lm_head.weight[len(tokenizer):] = 0.0  # a vocabulary padded past the tokenizer's
    return model


def greedy_variety(model: Qwen2VLForConditionalGeneration, tokenizer: Qwen2Tokenizer,
                   prompts: Sequence[str] = CHECK_PROMPTS, max_tokens: int = 64) -> list[float]:
    """Distinct tokens / tokens of each prompt's greedy answer (1.0: no token twice; near 0: a loop)."""
    varieties = []
    for prompt in prompts:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        answer = output[0, inputs["input_ids"].shape[1]:].tolist()
        varieties.append(len(set(answer)) / len(answer))
    return varieties


def build_bench_checkpoint(out_dir: pathlib.Path, seed: int = 0, shape: str = "bench") -> pathlib.Path:
    """Write the whole checkpoint directory of ``SHAPES[shape]`` into ``out_dir`` and return it."""
    tokenizer = build_tokenizer()
    return save_checkpoint(out_dir, build_bench_model(tokenizer, seed, SHAPES[shape]), tokenizer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=SHAPES, default="bench")
    parser.add_argument("--check", action="store_true", help="print the greedy variety of the built model")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    print(build_bench_checkpoint(args.out_dir, args.seed, args.shape))
    if args.check:
        varieties = greedy_variety(Qwen2VLForConditionalGeneration.from_pretrained(args.out_dir).eval(),
                                   build_tokenizer())
        print(f"greedy distinct tokens / length over {len(varieties)} prompts: mean "
              f"{sum(varieties) / len(varieties):.2f}, min {min(varieties):.2f}")


if __name__ == "__main__":
    main()
