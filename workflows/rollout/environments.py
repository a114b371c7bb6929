"""The environments of multi-turn episodes (workflows/rollout/multiturn.py).

After each assistant turn the workflow calls `await env.step(completion, turn=t,
last=..., data=row)`; the environment answers with the messages to append (user
feedback, tool results) or with the end of the episode and its reward (`EnvStep`).
Shipped: `RetryEnvironment` (a wrong answer gets a fixed message asking to try again, as
AReaL's multi-turn math example) and `ToolEnvironment` (tool calls are executed and their
results appended; a turn without a tool call is the final answer). A user environment is
any object with `tools` (JSON schemas, or None) and this `step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

from workflows.api import Scorer
from workflows.config import DEFAULT_FEEDBACK
from workflows.rollout.tools import ToolRegistry, parse_tool_calls, tool_message


@dataclass
class EnvStep:
    """An environment's answer to a turn: `messages` to append (none when `done`), the
    episode's `reward` when `done`, whether it was `solved`, how many tool calls failed
    this turn (`tool_errors`), and `out_of_turns` when the episode ends because it used
    its last turn without finishing (counted with the budget overruns)."""

    messages: list[dict] = field(default_factory=list)
    done: bool = False
    reward: float = 0.0
    solved: bool = False
    tool_errors: int = 0
    out_of_turns: bool = False


class Environment(Protocol):
    tools: Optional[list[dict]]

    async def step(self, completion: str, *, turn: int, last: bool, data: dict) -> EnvStep: ...


async def _score(scorer: Scorer, completion: str, data: dict) -> float:
    return await scorer.ascore(completion, data["answer"], prompt=data.get("prompt"), row=data.get("columns"))


class RetryEnvironment:
    """Retry with feedback: a right answer (score >= 1) at turn t (1-based) ends the
    episode with reward `score * turn_discount ** (t - 1)`; a wrong one gets `feedback`
    as a user message, or, at the last turn, ends it with its (discounted) score.

    Raises (from `step`): RewardFunctionError, as `scorer.ascore`.
    """

    tools = None

    def __init__(self, scorer: Scorer, *, turn_discount: float = 1.0, feedback: str = DEFAULT_FEEDBACK):
        self.scorer = scorer
        self.turn_discount = turn_discount
        self.feedback = feedback

    async def step(self, completion: str, *, turn: int, last: bool, data: dict) -> EnvStep:
        score = await _score(self.scorer, completion, data)
        reward = score * self.turn_discount ** (turn - 1)
        if score >= 1.0:
            return EnvStep(done=True, reward=reward, solved=True)
        if last:
            return EnvStep(done=True, reward=reward)
        return EnvStep(messages=[{"role": "user", "content": self.feedback}])


class ToolEnvironment:
    """Tool use: each `<tool_call>` of a turn is executed (`ToolRegistry.acall`) and its
    result appended as a tool message; a turn without one is the final answer, scored by
    `scorer` (reward `score * turn_discount ** (t - 1)`). Tool calls at the last turn end
    the episode with reward 0 (`out_of_turns`). A failing tool never ends the episode:
    its error is the model's to read, and it is counted (`tool_errors`).

    Raises (from `step`): RewardFunctionError, as `scorer.ascore`.
    """

    def __init__(self, scorer: Scorer, registry: ToolRegistry, *, turn_discount: float = 1.0):
        self.scorer = scorer
        self.registry = registry
        self.turn_discount = turn_discount
        self.tools = registry.schemas

    async def step(self, completion: str, *, turn: int, last: bool, data: dict) -> EnvStep:
        calls = parse_tool_calls(completion)
        if not calls:
            score = await _score(self.scorer, completion, data)
            return EnvStep(done=True, reward=score * self.turn_discount ** (turn - 1), solved=score >= 1.0)
        if last:
            return EnvStep(done=True, out_of_turns=True)
        messages, errors = [], 0
        for call in calls:
            # One after the other: calls may depend on each other's effects.
            text, failed = await self.registry.acall(call)
            errors += failed
            messages.append(tool_message(call.name, text))
        return EnvStep(messages=messages, tool_errors=errors)
