"""The reference the stack must match: transformers' own Qwen2-VL processing and `generate`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


@lru_cache(maxsize=2)
def _load(checkpoint: str):
    model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint), Qwen2VLImageProcessorPil.from_pretrained(checkpoint)


def expand_pads(text: str, pad: str, counts: list[int]) -> str:
    """What Qwen2VLProcessor does to the rendered prompt: one pad token per merged patch."""
    pieces = text.split(pad)
    assert len(pieces) == len(counts) + 1, "one count per pad token"
    return "".join(p + pad * n for p, n in zip(pieces, counts + [0]))


def hf_generate(checkpoint: Path, messages: list[dict], images: list[Image.Image] = (),
                video: tuple[np.ndarray, np.ndarray] | None = None, max_new_tokens: int = 16) -> tuple[str, int]:
    """Greedy text and number of generated tokens (eos included, as the API counts it)."""
    model, tokenizer, image_processor = _load(str(checkpoint))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    merge = model.config.vision_config.spatial_merge_size ** 2
    kwargs = {}
    if images:
        processed = image_processor(images=list(images), return_tensors="pt")
        kwargs.update(pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"])
        counts = [int(g.prod()) // merge for g in processed["image_grid_thw"]]
        text = expand_pads(text, "<|image_pad|>", counts)
    if video is not None:
        pixel_values, grid = video
        kwargs.update(pixel_values_videos=torch.from_numpy(pixel_values),
                      video_grid_thw=torch.from_numpy(np.asarray(grid).reshape(1, 3)))
        text = expand_pads(text, "<|video_pad|>", [int(np.prod(grid)) // merge])
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    # The processor's modality map (0 text, 1 image pad, 2 video pad); without it generate falls back
    # to 1-D text positions instead of M-RoPE.
    mm_token_type_ids = ((input_ids == model.config.image_token_id).long()
                         + 2 * (input_ids == model.config.video_token_id).long())
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             mm_token_type_ids=mm_token_type_ids, max_new_tokens=max_new_tokens, **kwargs)
    generated = out[0, input_ids.shape[1]:].tolist()
    return tokenizer.decode(generated, skip_special_tokens=True), len(generated)


def hf_generate_text(checkpoint: Path, prompt: str, max_new_tokens: int = 16) -> tuple[str, int]:
    """Greedy continuation of a plain-text prompt (no chat template), as text completions run it."""
    model, tokenizer, _ = _load(str(checkpoint))
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens)
    generated = out[0, input_ids.shape[1]:].tolist()
    return tokenizer.decode(generated, skip_special_tokens=True), len(generated)
