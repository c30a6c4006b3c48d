"""The one list of sampling options: checks, the server's defaults, and the context policy."""

from __future__ import annotations

import json

import pytest

from openai_proxy.chat_schemas import ChatCompletionRequest
from openai_proxy.messages import sampling_params
from openai_proxy.schemas import GenerationRequest
from vlmserve.errors import InvalidRequest
from vlmserve.sampling_options import (
    OPTIONS,
    check_options,
    checkpoint_defaults,
    max_tokens_for,
)


def test_options_are_checked_by_name_and_json_type():
    assert check_options({"temperature": 0, "stop": ["x"], "seed": None}) == {"temperature": 0, "stop": ["x"]}
    with pytest.raises(InvalidRequest, match="unknown sampling option 'best_of'"):
        check_options({"best_of": 2})
    with pytest.raises(InvalidRequest, match="max_tokens must be int"):
        check_options({"max_tokens": "5"})
    with pytest.raises(InvalidRequest, match="max_tokens must be int"):
        check_options({"max_tokens": True})  # a bool is an int to Python, not to JSON
    with pytest.raises(InvalidRequest, match="must be a JSON object"):
        check_options(["temperature"])


def test_a_request_that_does_not_fit_the_context_is_refused_and_the_default_is_capped():
    assert max_tokens_for(None, 100, 4096, 512) == 512
    assert max_tokens_for(None, 3900, 4096, 512) == 196  # the default never makes a request fail
    assert max_tokens_for(96, 4000, 4096, 512) == 96
    with pytest.raises(InvalidRequest, match=r"Input length \(4000\) plus max_tokens \(97\) exceeds"):
        max_tokens_for(97, 4000, 4096, 512)
    with pytest.raises(InvalidRequest, match=r"Input length \(4096\) exceeds model's maximum context length"):
        max_tokens_for(None, 4096, 4096, 512)


def test_a_checkpoint_s_generation_config_gives_the_server_s_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.01, "top_k": 1, "top_p": 0.001, "repetition_penalty": 1.05, "do_sample": True,
         "max_new_tokens": 2048, "eos_token_id": [1, 2]}))
    assert checkpoint_defaults(tmp_path) == {"temperature": 0.01, "top_k": 1, "top_p": 0.001,
                                             "repetition_penalty": 1.05, "max_tokens": 2048}
    assert checkpoint_defaults(tmp_path / "none") == {}


def test_the_proxy_forwards_every_option_it_has_a_field_for_under_the_same_name():
    # Adding an option is one entry in OPTIONS and one field in the proxy's schema: this is the link.
    shared = {name for name in OPTIONS if name in GenerationRequest.model_fields}
    assert {"temperature", "top_k", "seed", "min_tokens", "ignore_eos", "structured_outputs"} <= shared
    request = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "min_tokens": 3, "ignore_eos": True})
    assert sampling_params(request, None) == {"min_tokens": 3, "ignore_eos": True}
