"""Tool calling in Qwen's format (the Hermes format that Qwen2.5's chat template and vLLM's `hermes` tool
parser use): tools described in the system message, calls written as `<tool_call>{json}</tool_call>`,
results given back as `<tool_response>` user turns.

Qwen2-VL's own chat template knows no tools, so the proxy renders them into plain messages. A forced
call (a named tool_choice, or "required") is constrained with a JSON schema, as vLLM does: the model then
writes the arguments object (named) or a list of calls (required), which always parse.
"""

from __future__ import annotations

import json
import re
import uuid

from openai_proxy.chat_schemas import ChatCompletionRequest, Tool, ToolCall
from openai_proxy.schemas import StructuredOutputs

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.DOTALL)
DEFAULT_SYSTEM = "You are a helpful assistant."
_NO_ARGUMENTS = {"type": "object", "properties": {}}


def tools_prompt(tools: list[Tool]) -> str:
    """The system-message section that describes the tools (Qwen2.5's wording)."""
    signatures = "\n".join(json.dumps(tool.model_dump(exclude_none=True), ensure_ascii=False) for tool in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{signatures}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            f"{CALL_OPEN}{CALL_CLOSE} XML tags:\n{CALL_OPEN}\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n' + CALL_CLOSE)


def with_tools_prompt(messages: list[dict], tools: list[Tool]) -> list[dict]:
    """HF messages whose system message (the default one if there is none) ends with the tools' description."""
    if messages and messages[0]["role"] == "system":
        system, rest = messages[0]["content"], messages[1:]
        if isinstance(system, list):
            system = "".join(part["text"] for part in system)
    else:
        system, rest = DEFAULT_SYSTEM, messages
    return [{"role": "system", "content": f"{system}\n\n{tools_prompt(tools)}"}, *rest]


def call_text(call: ToolCall) -> str:
    """An earlier call of the conversation as the model writes one."""
    body = {"name": call.function.name, "arguments": json.loads(call.function.arguments)}
    return f"{CALL_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{CALL_CLOSE}"


def response_text(content: str) -> str:
    """A tool's result as Qwen's template gives it back (inside a user turn)."""
    return f"<tool_response>\n{content}\n</tool_response>"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def new_call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=call_id(), function={"name": name, "arguments": arguments})


def parse_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Content and calls of a free answer (tool_choice "auto"). A block that is not a JSON call stays
    content, as vLLM's hermes parser leaves it."""
    calls = []
    for block in _CALL.findall(text):
        try:
            body = json.loads(block)
            name, arguments = body["name"], body.get("arguments", {})
            if isinstance(name, str) and isinstance(arguments, dict):
                calls.append(new_call(name, json.dumps(arguments, ensure_ascii=False)))
                continue
        except (ValueError, KeyError, TypeError):
            pass
        return text, []
    if not calls:
        return text, []
    content = text[: text.index(CALL_OPEN)].strip()
    return content or None, calls


def forced_call_constraint(request: ChatCompletionRequest) -> StructuredOutputs | None:
    """The JSON schema a forced call is generated under: the named tool's arguments object, or for
    "required" a non-empty list of calls of the given tools. None when calls are not forced."""
    if request.tool_mode == "named":
        name = request.tool_choice.function.name
        tool = next(tool for tool in request.tools if tool.function.name == name)
        return StructuredOutputs(json=tool.function.parameters or _NO_ARGUMENTS)
    if request.tool_mode == "required":
        calls = [{"type": "object", "properties": {"name": {"enum": [tool.function.name]},
                                                   "arguments": tool.function.parameters or _NO_ARGUMENTS},
                  "required": ["name", "arguments"]} for tool in request.tools]
        one = {"maxItems": 1} if request.parallel_tool_calls is False else {}
        return StructuredOutputs(json={"type": "array", "minItems": 1, **one, "items": {"anyOf": calls}})
    return None


def parse_required(text: str) -> list[ToolCall]:
    """The calls of a tool_choice "required" answer (empty if it is not the list its schema asks for)."""
    try:
        items = json.loads(text)
        return [new_call(item["name"], json.dumps(item["arguments"], ensure_ascii=False)) for item in items]
    except (ValueError, KeyError, TypeError):
        return []
