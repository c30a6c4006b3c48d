"""The sampling options one request may set: their one list, the server's defaults, and the context policy.

The proxy forwards the options a client set, under these names. The `vlm` model checks them before any
work, fills in the server's defaults and hands them to vLLM, whose SamplingParams fields they are (stop
strings included: vLLM's output processing matches them). Adding an option means adding it here and to
the proxy's request schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlmserve.errors import InvalidRequest

# The server's default answer length when a request sets none, capped by what the context has left.
DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class Option:
    name: str
    types: tuple[type, ...]  # its JSON types; vLLM checks the ranges


_NUMBER = (int, float)
OPTIONS: dict[str, Option] = {option.name: option for option in (
    Option("max_tokens", (int,)),
    Option("temperature", _NUMBER),
    Option("top_p", _NUMBER),
    Option("top_k", (int,)),
    Option("min_p", _NUMBER),
    Option("seed", (int,)),
    Option("frequency_penalty", _NUMBER),
    Option("presence_penalty", _NUMBER),
    Option("repetition_penalty", _NUMBER),
    Option("stop", (list,)),
    Option("ignore_eos", (bool,)),
    Option("min_tokens", (int,)),
    Option("logprobs", (int,)),  # how many top tokens, besides the sampled one
    Option("structured_outputs", (dict,)),  # vLLM's StructuredOutputsParams fields
)}
# What a checkpoint's generation_config.json may set as the server's defaults, as vLLM's server reads it.
_GENERATION_CONFIG_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                               "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def check_options(fields: object) -> dict:
    """The options of a request, checked for known names and JSON types; InvalidRequest otherwise."""
    if not isinstance(fields, dict):
        raise InvalidRequest("sampling must be a JSON object")
    for name, value in fields.items():
        option = OPTIONS.get(name)
        if option is None:
            raise InvalidRequest(f"unknown sampling option {name!r}")
        if value is not None and (not isinstance(value, option.types)
                                  or (isinstance(value, bool) and bool not in option.types)):
            raise InvalidRequest(f"sampling option {name} must be {' or '.join(t.__name__ for t in option.types)}, "
                                 f"got {value!r}")
    return {name: value for name, value in fields.items() if value is not None}


def checkpoint_defaults(checkpoint: str | Path) -> dict:
    """The sampling defaults a checkpoint's generation_config.json sets (vLLM's server applies them too)."""
    path = Path(checkpoint) / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    return {ours: config[theirs] for theirs, ours in _GENERATION_CONFIG_DEFAULTS.items() if theirs in config}


def max_tokens_for(requested: int | None, prompt_tokens: int, max_model_len: int, default: int) -> int:
    """The answer length of a request: what it asked for, which must fit the context with the prompt
    (InvalidRequest otherwise, naming both numbers as vLLM does); or the default, capped by the context."""
    if prompt_tokens >= max_model_len:
        raise InvalidRequest(f"Input length ({prompt_tokens}) exceeds model's maximum context length "
                             f"({max_model_len})")
    if requested is None:
        return min(default, max_model_len - prompt_tokens)
    if prompt_tokens + requested > max_model_len:
        raise InvalidRequest(f"Input length ({prompt_tokens}) plus max_tokens ({requested}) exceeds model's "
                             f"maximum context length ({max_model_len})")
    return requested
