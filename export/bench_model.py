"""Build the `bench` random-weight Qwen2-VL checkpoint: Qwen2-VL's proportions at a size a CPU serves.

``python -m export.bench_model OUT_DIR [--seed 0] [--check]`` writes a checkpoint laid out like
Qwen2-VL-2B-Instruct, with the tokenizer, chat template and processor configs of
``export.tiny_model`` (so the same preprocessing and token ids) and these sizes:

* LLM: hidden 512, 8 layers, 8 query heads of 64 with 2 KV heads (GQA 4:1), MLP 2816 (5.5x, as
  Qwen2-VL's 5.3-5.8x), M-RoPE sections [8, 12, 12] (Qwen2-VL's [16, 24, 24] for head_dim 128, halved).
* ViT: embed 256, depth 8, 4 heads of 64, MLP ratio 4, merger into the LLM's 512.

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
ATTENTION_SHARPNESS = 8.0
CHECK_PROMPTS = (
    "Describe this image.",
    "What color is the car?",
    "How many animals are there in the park near the river?",
    "Where was this photo taken?",
    "The red dog runs across the street.",
    "Summarize the video in one sentence.",
)


def build_bench_config(tokenizer: Qwen2Tokenizer, text: Mapping = TEXT_CONFIG,
                       vision: Mapping = VISION_CONFIG) -> Qwen2VLConfig:
    """The tiny checkpoint's config (token ids, activations, patching) with the sizes of `text` and `vision`."""
    config = build_config(tokenizer).to_dict()
    # layer_types is derived from the layer count; dropping it lets the new count derive it again.
    text_config = {k: v for k, v in config["text_config"].items() if k != "layer_types"}
    config.update(text_config={**text_config, **text}, vision_config={**config["vision_config"], **vision})
    return Qwen2VLConfig.from_dict(config)


def never_generated_ids(tokenizer: Qwen2Tokenizer) -> list[int]:
    """Special tokens other than EOS, and tokens whose bytes alone are an incomplete UTF-8 sequence."""
    special = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS if t not in EOS_TOKENS]
    # The corpus holds no U+FFFD, so a replacement character can only come from undecodable bytes.
    partial = [i for i in range(tokenizer.vocab_size) if "\ufffd" in tokenizer.decode([i])]
    return special + partial


def build_bench_model(tokenizer: Qwen2Tokenizer, seed: int, text: Mapping = TEXT_CONFIG,
                      vision: Mapping = VISION_CONFIG) -> Qwen2VLForConditionalGeneration:
    """Seeded random weights, shaped as the module docstring says."""
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(build_bench_config(tokenizer, text, vision)).eval()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.mul_(ATTENTION_SHARPNESS)
                projection.bias.mul_(ATTENTION_SHARPNESS)
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
        model.lm_head.weight[never_generated_ids(tokenizer)] = 0.0
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


def build_bench_checkpoint(out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write the whole checkpoint directory into ``out_dir`` and return it."""
    tokenizer = build_tokenizer()
    return save_checkpoint(out_dir, build_bench_model(tokenizer, seed), tokenizer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="print the greedy variety of the built model")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    print(build_bench_checkpoint(args.out_dir, args.seed))
    if args.check:
        varieties = greedy_variety(Qwen2VLForConditionalGeneration.from_pretrained(args.out_dir).eval(),
                                   build_tokenizer())
        print(f"greedy distinct tokens / length over {len(varieties)} prompts: mean "
              f"{sum(varieties) / len(varieties):.2f}, min {min(varieties):.2f}")


if __name__ == "__main__":
    main()
