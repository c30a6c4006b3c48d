"""Prompt construction on the small checkpoint's tokenizer (the text of the answers is vLLM's: its
incremental detokenizer and stop strings, checked through the service in test_vlm_service.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoConfig, AutoTokenizer

from vlmserve.errors import InvalidRequest
from vlmserve.inputs.request import ClientRequest, parse_request
from vlmserve.inputs.prompt import PromptBuilder, media_parts, validate_messages


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def test_prompt_expands_one_pad_per_merged_patch(tiny_checkpoint, tokenizer):
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    builder = PromptBuilder(tokenizer, config.image_token_id, config.video_token_id,
                            config.vision_config.spatial_merge_size)
    messages = validate_messages([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "and"}, {"type": "video", "fps": 2.0}]}])
    assert [p["type"] for p in media_parts(messages)] == ["image", "video"]
    ids = builder.build(messages, [("image", np.array([1, 4, 6])), ("video", np.array([2, 4, 4]))])
    assert int((ids == config.image_token_id).sum()) == 6
    assert int((ids == config.video_token_id).sum()) == 8
    with pytest.raises(InvalidRequest):
        builder.build(messages, [("video", np.array([2, 4, 4])), ("image", np.array([1, 4, 6]))])


@pytest.mark.parametrize("messages", [
    [], "hi", [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}],
    [{"role": "user", "content": [{"type": "audio"}]}],
    [{"role": "assistant", "content": [{"type": "image"}]}],
])
def test_invalid_messages_are_rejected(messages):
    with pytest.raises(InvalidRequest):
        validate_messages(messages)


def test_raw_prompts_are_tokenized_as_they_are(tiny_checkpoint, tokenizer):
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    builder = PromptBuilder(tokenizer, config.image_token_id, config.video_token_id,
                            config.vision_config.spatial_merge_size)
    assert builder.raw("Once upon a time").tolist() == tokenizer("Once upon a time")["input_ids"]
    with pytest.raises(InvalidRequest, match="pad tokens"):
        builder.raw("an <|image_pad|> smuggled in")
    for bad in ("", None, ["text"]):
        with pytest.raises(InvalidRequest, match="prompt must be a non-empty string"):
            parse_request(json.dumps({"prompt": bad}), 0)
    with pytest.raises(InvalidRequest, match="neither messages nor media"):
        parse_request(json.dumps({"prompt": "x"}), 1)
    assert parse_request(json.dumps({"prompt": "x", "sampling": {"top_k": 2}}), 0) == ClientRequest(None, "x",
                                                                                                    {"top_k": 2})
