"""Tools a model may call: Python callables named by import path, their JSON schemas, the
parsing of tool calls from a completion, and their execution.

A tool is a function with type hints and a Google-style docstring (`Args:` naming each
parameter); its JSON schema, which the chat template shows the model
(`tokenizer.apply_chat_template(..., tools=[schema, ...])`), is derived by transformers'
`get_json_schema`. Name tools in `multi_turn.tools` as `package.module:function` or
`path/to/file.py:function`, or `python` for the shipped sandboxed interpreter
(workflows/rollout/sandbox.py). A function tool runs in the rollout's process (sync ones
on a worker thread) with `multi_turn.sandbox.wall_seconds` as its timeout: only the
`python` tool is sandboxed.

Tool calls are read in the Hermes / Qwen2.5 format that those models' chat templates
teach: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one or more per turn.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from workflows.rollout.sandbox import SandboxLimits, arun_python, truncate_middle

PYTHON_TOOL = "python"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class ToolCall:
    """One parsed call: `name` and `arguments`, or `error` (what was malformed) instead."""

    name: Optional[str]
    arguments: dict = field(default_factory=dict)
    error: Optional[str] = None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>{json}</tool_call>` block of `text`, in order. A block whose body
    is not a JSON object with a string `name` (and an object `arguments`, if any) is a
    `ToolCall` with `error` set, which the model is told about; an unclosed
    `<tool_call>` counts as malformed too."""
    calls = []
    for body in _TOOL_CALL.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as exc:
            calls.append(ToolCall(None, error=f"the tool call is not valid JSON ({exc.msg})"))
            continue
        args = obj.get("arguments", {}) if isinstance(obj, dict) else None
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(args, dict):
            calls.append(ToolCall(None, error='a tool call must be {"name": str, "arguments": {...}}'))
            continue
        calls.append(ToolCall(obj["name"], args))
    if text.count("<tool_call>") > len(_TOOL_CALL.findall(text)):
        calls.append(ToolCall(None, error="a <tool_call> was not closed with </tool_call>"))
    return calls


def python(code: str) -> str:
    """Run a Python program and return what it prints.

    Args:
        code: The program's source. It runs in a fresh process with limited CPU time,
            memory and output; print the values you need.
    """
    raise RuntimeError("the python tool runs in the sandbox; call it through ToolRegistry")  # schema only


def tool_schema(fn: Callable) -> dict:
    """transformers' `get_json_schema(fn)`: `{"type": "function", "function": {"name",
    "description", "parameters"}}`.

    Raises:
        ValueError: the function lacks type hints or a docstring describing every argument.
    """
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as exc:  # noqa: BLE001 - transformers raises its own TypeHintParsingException / DocstringParsingException
        raise ValueError(f"tool {getattr(fn, '__name__', fn)!r} has no usable JSON schema: {exc}") from None


def load_tools(specs: list[str]) -> dict[str, Callable]:
    """`multi_turn.tools` -> {tool name: function}, `python` being the sandboxed interpreter.

    Raises:
        UserCodeError: a spec does not load or is not callable.
        ValueError: a tool has no usable schema, or two tools share a name.
    """
    from workflows.user_code import UserCodeError, load_object

    tools: dict[str, Callable] = {}
    for spec in specs:
        fn = python if spec == PYTHON_TOOL else load_object(spec, "multi_turn.tools")
        if not callable(fn):
            raise UserCodeError(f"multi_turn.tools entry {spec!r} is not callable")
        name = tool_schema(fn)["function"]["name"]
        if name in tools:
            raise ValueError(f"multi_turn.tools has two tools named {name!r}")
        tools[name] = fn
    return tools


class ToolRegistry:
    """The tools of an episode: their schemas for the chat template and `acall`, which
    never raises for a tool's failure (it becomes the returned message).

    Args:
        tools: {name: function} (`load_tools`).
        limits: the sandbox's limits (the `python` tool) and, as `wall_seconds`, every
            other tool's timeout.
    """

    def __init__(self, tools: dict[str, Callable], limits: SandboxLimits = SandboxLimits()):
        self.tools = dict(tools)
        self.limits = limits
        self.schemas = [tool_schema(fn) for fn in self.tools.values()]

    async def acall(self, call: ToolCall) -> tuple[str, bool]:
        """(the message for the model, whether the call failed)."""
        if call.error is not None:
            return f"error: {call.error}", True
        fn = self.tools.get(call.name)
        if fn is None:
            return f"error: no tool named {call.name!r}; the tools are {', '.join(self.tools)}", True
        if fn is python:
            code = call.arguments.get("code")
            if not isinstance(code, str):
                return "error: the python tool takes one argument, code (a string)", True
            result = await arun_python(code, self.limits)
            return result.message(), not result.ok
        try:
            bound = inspect.signature(fn).bind(**call.arguments)
        except TypeError as exc:
            return f"error: bad arguments for {call.name}: {exc}", True
        try:
            if inspect.iscoroutinefunction(fn):
                value = await asyncio.wait_for(fn(*bound.args, **bound.kwargs), self.limits.wall_seconds)
            else:
                value = await asyncio.wait_for(asyncio.to_thread(fn, *bound.args, **bound.kwargs),
                                               self.limits.wall_seconds)
        except asyncio.TimeoutError:
            return f"error: {call.name} took more than {self.limits.wall_seconds} s", True
        except Exception as exc:  # noqa: BLE001 - a tool's failure is the model's information, not the run's
            return f"error: {call.name} raised {type(exc).__name__}: {exc}", True
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        return truncate_middle(text, self.limits.output_chars), False


def tool_message(name: Optional[str], content: Any) -> dict:
    """A chat message holding a tool's result, as transformers' chat templates take it."""
    message = {"role": "tool", "content": content}
    if name:
        message["name"] = name
    return message
