"""The bench checkpoint's weight shaping, on a shrunken copy (2 layers of 128, heads of 64) so it runs in seconds."""

from __future__ import annotations

import statistics

import pytest
import torch

from export import bench_model
from export.bench_model import (SHAPES, Shape, build_bench_config, build_bench_model, greedy_variety,
                                never_generated_ids)
from export.tiny_model import EOS_TOKENS, SPECIAL_TOKENS, build_tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

SMALL_TEXT = {**bench_model.TEXT_CONFIG, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "max_window_layers": 2}
SMALL_VISION = {"embed_dim": 64, "depth": 1, "num_heads": 1, "hidden_size": 128}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(tokenizer, seed: int = 0):
    return build_bench_model(tokenizer, seed, Shape(SMALL_TEXT, SMALL_VISION))


def test_bench_sizes_have_qwen2_vl_proportions(tokenizer):
    config = build_bench_config(tokenizer)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.head_dim) == (512, 8, 64) and not config.tie_word_embeddings
    assert text.num_attention_heads * text.head_dim == text.hidden_size
    assert text.num_attention_heads % text.num_key_value_heads == 0 and len(text.layer_types) == 8
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert (vision.embed_dim, vision.depth, vision.embed_dim // vision.num_heads) == (256, 8, 64)
    assert vision.hidden_size == text.hidden_size  # the merger feeds the LLM
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_never_generated_tokens_have_zero_rows_and_are_the_undecodable_ones(tokenizer):
    ids = never_generated_ids(tokenizer)
    eos = {tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS}
    assert eos.isdisjoint(ids)
    assert {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS} - eos <= set(ids)
    partial = [i for i in ids if i < tokenizer.vocab_size]
    assert partial, "a byte-level BPE has lone continuation bytes"
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    for i in range(tokenizer.vocab_size):  # the byte-level alphabet's own view of each token
        token_bytes = bytes(byte_of[c] for c in tokenizer.convert_ids_to_tokens(i))
        try:
            token_bytes.decode("utf-8")
        except UnicodeDecodeError:
            assert i in partial, token_bytes
        else:
            assert i not in partial, token_bytes
    model = small_model(tokenizer)
    assert not model.lm_head.weight[ids].any()
    kept = sorted(set(range(model.lm_head.weight.shape[0])) - set(ids))
    assert model.lm_head.weight[kept].abs().sum(dim=1).min() > 0


def test_the_build_is_deterministic_for_a_seed(tokenizer):
    first, again, other = small_model(tokenizer, 3), small_model(tokenizer, 3), small_model(tokenizer, 4)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_sharp_attention_keeps_greedy_output_from_looping(tokenizer, monkeypatch):
    varieties = greedy_variety(small_model(tokenizer), tokenizer, max_tokens=32)
    assert min(varieties) > 0.8, varieties
    monkeypatch.setattr(bench_model, "ATTENTION_SHARPNESS", 1.0)  # the usual init: the check does see loops
    flat = greedy_variety(small_model(tokenizer), tokenizer, max_tokens=32)
    assert statistics.fmean(flat) < 0.5, flat


def test_the_2b_shape_is_qwen2_vl_2b_instruct(tokenizer):
    config = build_bench_config(tokenizer, SHAPES["2b"])
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size) == (1536, 8960, 28, 151936)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (12, 2, 128)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and len(text.layer_types) == 28
    assert (vision.embed_dim, vision.depth, vision.num_heads, vision.hidden_size) == (1280, 32, 16, 1536)
    assert config.tie_word_embeddings and config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_a_vocabulary_padded_past_the_tokenizer_is_never_generated(tokenizer):
    padded = Shape({**SMALL_TEXT, "vocab_size": len(tokenizer) + 64}, SMALL_VISION, tie_word_embeddings=True,
                   dtype=torch.bfloat16)
    model = build_bench_model(tokenizer, 0, padded)
    assert model.lm_head.weight.dtype == torch.bfloat16 and torch.get_default_dtype() == torch.float32
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.lm_head.weight.shape[0] == len(tokenizer) + 64 and not model.lm_head.weight[len(tokenizer):].any()
