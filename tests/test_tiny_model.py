"""The tiny Qwen2-VL checkpoint loads with stock transformers classes and behaves like the real layout."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from export.tiny_model import BPE_VOCAB_SIZE, EOS_TOKENS, SPECIAL_TOKENS, build_tiny_checkpoint

IMAGE_MESSAGE = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def tokenizer(checkpoint: pathlib.Path):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def model(checkpoint: pathlib.Path) -> Qwen2VLForConditionalGeneration:
    return Qwen2VLForConditionalGeneration.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def image_processor(checkpoint: pathlib.Path) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil.from_pretrained(checkpoint)


def _image(seed: int, height: int = 56, width: int = 84) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _image_inputs(tokenizer, image_processor, image: Image.Image) -> dict[str, torch.Tensor]:
    """What Qwen2VLProcessor produces: one <|image_pad|> per merged 2x2 patch group."""
    vision = image_processor(images=[image], return_tensors="pt")
    n_tokens = int(vision["image_grid_thw"].prod()) // image_processor.merge_size**2
    text = tokenizer.apply_chat_template(IMAGE_MESSAGE, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_tokens)
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
    }


def _greedy(model, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Generated ids and the top1-top2 logit gap at every step."""
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True
        )
    gaps = []
    for logits in out.logits:
        top2 = logits[0].topk(2).values
        gaps.append(float(top2[0] - top2[1]))
    return out.sequences[0, inputs["input_ids"].shape[1] :].tolist(), gaps


def test_special_tokens_follow_bpe_vocab_and_match_config(checkpoint, tokenizer, model) -> None:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert list(ids.values()) == list(range(BPE_VOCAB_SIZE, BPE_VOCAB_SIZE + len(SPECIAL_TOKENS)))
    config = model.config
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_id == ids["<|image_pad|>"]
    assert config.video_token_id == ids["<|video_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    assert config.text_config.eos_token_id == ids["<|im_end|>"]
    assert config.text_config.pad_token_id == ids["<|endoftext|>"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert set(model.generation_config.eos_token_id) == {ids[t] for t in EOS_TOKENS}
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert config.vision_config.hidden_size == config.text_config.hidden_size
    assert model.dtype == torch.float32


def test_tokenizer_round_trips_text_and_keeps_special_tokens_whole(tokenizer) -> None:
    text = "The café is naïve — 中文, 日本語 and emoji 😀🐱 Ünïcödé!"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    tagged = tokenizer("<|vision_start|><|image_pad|><|vision_end|>cat", add_special_tokens=False).input_ids
    assert tagged[:3] == tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
    assert tokenizer.decode(tagged, skip_special_tokens=True) == "cat"


def test_chat_template_renders_vision_parts(tokenizer) -> None:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Compare."}]}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>Compare.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_image_processor_has_qwen2_vl_2b_settings(checkpoint, image_processor) -> None:
    assert isinstance(AutoImageProcessor.from_pretrained(checkpoint, backend="pil"), Qwen2VLImageProcessorPil)
    assert image_processor.size["shortest_edge"] == 3136
    assert image_processor.size["longest_edge"] == 12845056
    patching = (image_processor.patch_size, image_processor.temporal_patch_size, image_processor.merge_size)
    assert patching == (14, 2, 2)
    assert (checkpoint / "video_preprocessor_config.json").is_file()


def test_auto_processor_loads(checkpoint) -> None:
    try:
        processor = AutoProcessor.from_pretrained(checkpoint)
    except ImportError as err:
        if "torchvision" not in str(err).lower():
            raise
        pytest.skip("Qwen2VLVideoProcessor needs torchvision, which this environment lacks")
    assert type(processor).__name__ == "Qwen2VLProcessor"


def test_generate_with_image_depends_on_the_image(tokenizer, image_processor, model) -> None:
    inputs = _image_inputs(tokenizer, image_processor, _image(0))
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 6
    tokens, _ = _greedy(model, inputs, max_new_tokens=20)
    assert len(tokens) == 20
    never_generated = set(tokenizer.convert_tokens_to_ids([t for t in SPECIAL_TOKENS if t not in EOS_TOKENS]))
    assert not never_generated & set(tokens)
    other, _ = _greedy(model, _image_inputs(tokenizer, image_processor, _image(1)), max_new_tokens=20)
    assert other != tokens


def test_greedy_has_clear_margins_and_varied_output(tokenizer, model) -> None:
    all_gaps = []
    for prompt in ("Tell me a short story about a red fox.", "中文 café 😀", "Describe this image."):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tokens, gaps = _greedy(model, dict(tokenizer(text, return_tensors="pt")), max_new_tokens=30)
        assert len(set(tokens)) >= 10, tokens
        all_gaps += gaps
    assert np.median(all_gaps) > 0.5


def test_build_is_deterministic_per_seed(checkpoint, tmp_path: pathlib.Path) -> None:
    again = build_tiny_checkpoint(tmp_path / "again", seed=0)
    for path in checkpoint.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    other = build_tiny_checkpoint(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (checkpoint / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
