"""Incremental detokenization, stop strings and prompt construction on the small checkpoint's tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoConfig, AutoTokenizer

from vlmserve.detokenizer import IncrementalDetokenizer, StopStringMatcher
from vlmserve.errors import InvalidRequest
from vlmserve.prompt import PromptBuilder, media_parts, validate_messages


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize("text", ["plain words here", "café au lait", "中文字符 and emoji 🙂🚀", "a\nb\tc  d"])
def test_deltas_join_to_the_full_text_and_never_split_a_character(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([i]) for i in ids]
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_stop_strings_cut_the_text_and_hold_back_partial_matches():
    matcher = StopStringMatcher(["STOP", "\n\n"])
    assert matcher.feed("hello S") == "hello "  # "S" may start "STOP"
    assert matcher.feed("T") == ""
    assert matcher.feed("OPPED and more") == ""
    assert matcher.stopped and matcher.flush() == ""
    released = StopStringMatcher(["STOP"])
    assert released.feed("a ST") == "a " and released.flush() == "ST"
    assert StopStringMatcher(["\n\n"]).feed("one\n\ntwo") == "one"


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
    for bad in ("", None, ["text"], "an <|image_pad|> smuggled in"):
        with pytest.raises(InvalidRequest):
            builder.raw(bad)
