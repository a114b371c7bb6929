"""Multi-turn episodes on exact tokens: `MultiTurnWorkflow` (`rollout.workflow=multi_turn`).

An episode is a conversation of up to `max_turns` assistant turns. After each turn an
environment (workflows/rollout/environments.py) sees the completion and returns the next
messages (user feedback, tool results) or the end with a reward.

Token-in, token-out: the trajectory row is the prompt's ids, then each turn's ids exactly
as the sampler returned them, then each appended message's ids, which are the chat
template's delta (`ChatDelta`): the template rendered on a fixed stand-in conversation
with and without the new messages, the difference taken once. Earlier turns are never
decoded and re-tokenised, so the trainer scores exactly the tokens the sampler produced
(re-tokenisation drift, and templates that rewrite history, cannot reach the trained
sequence). Loss mask 1 and behaviour logprobs only on sampled tokens; every sampled
token keeps the policy version that produced it, so a weight update between turns gives
an episode several versions.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from engines.config import GenerationConfig
from engines.inference import GenerationRequest, InferenceEngine
from workflows.api import Trajectory
from workflows.rollout.batch import pack_rows
from workflows.rollout.environments import Environment

# Per-sample columns a multi-turn trajectory carries beside workflows/api.py's, each [n]
# long: turns taken, the turn that solved the episode (0: unsolved), failed tool calls,
# and 1 where a token budget or the last turn ended the episode early.
EPISODE_KEYS = ("num_turns", "solved_turn", "tool_errors", "over_budget")


class ChatTemplateError(ValueError):
    """The chat template cannot append a message without changing what precedes it."""


def render_ids(tokenizer, messages: list[dict], *, tools: Optional[list[dict]], add_generation_prompt: bool) -> list[int]:
    """`tokenizer.apply_chat_template` as a plain list of token ids."""
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                        tokenize=True, return_dict=False)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class ChatDelta:
    """The token ids that append messages after an assistant turn, from the chat template.

    The template is rendered once on a stand-in conversation (a user message, an
    assistant answer) and again with the new messages and the generation prompt; the
    delta is everything after the assistant's end-of-turn token (`end_of_turn_id`), i.e.
    the turn's closing (e.g. ChatML's newline), the messages, and the next assistant
    header. Only the delta is tokenised; the real conversation is never rendered.

    Raises:
        ChatTemplateError: the template has no end-of-turn token after an assistant
            answer, or appending messages changes the tokens before it.
    """

    def __init__(self, tokenizer, end_of_turn_id: int, tools: Optional[list[dict]] = None):
        self.tokenizer, self.tools, self.end_of_turn_id = tokenizer, tools, end_of_turn_id
        self.base = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
        base_ids = render_ids(tokenizer, self.base, tools=tools, add_generation_prompt=False)
        if end_of_turn_id not in base_ids:
            raise ChatTemplateError(f"the chat template ends no assistant turn with token {end_of_turn_id} "
                                    "(the eos token); multi-turn episodes need the template's end-of-turn token")
        self.cut = len(base_ids) - base_ids[::-1].index(end_of_turn_id)
        self.prefix = base_ids[: self.cut]

    def __call__(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` appended after an assistant turn ending in the
        end-of-turn token, up to the next assistant header."""
        full = render_ids(self.tokenizer, self.base + list(messages), tools=self.tools, add_generation_prompt=True)
        if full[: self.cut] != self.prefix:
            raise ChatTemplateError("the chat template renders earlier turns differently once a message is appended "
                                    f"(roles {[m['role'] for m in messages]}); its deltas would not be exact")
        return full[self.cut:]


@dataclass
class Episode:
    """One conversation as flat token lists (prompt included) and its outcome."""

    input_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    versions: list[int]
    reward: float = 0.0
    num_turns: int = 0
    solved_turn: int = 0
    tool_errors: int = 0
    over_budget: bool = False
    last_text: str = ""

    def append(self, ids: list[int], *, logprobs: Optional[list[float]] = None, versions: Optional[list[int]] = None):
        self.input_ids += ids
        self.loss_mask += [1 if logprobs is not None else 0] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)
        self.versions += list(versions) if versions is not None else [-1] * len(ids)


class MultiTurnWorkflow:
    """`gconfig.n_samples` concurrent episodes of one prompt, each up to `max_turns`
    assistant turns against a fresh environment from `make_env()`.

    Budgets: each turn samples at most `max_tokens_per_turn` tokens; the episode's
    tokens after the prompt (sampled and appended) stay within `max_total_tokens`. An
    episode that would exceed one ends with its reward so far (0: the shipped
    environments reward only the end) and `over_budget` 1.

    `await arun_episode(engine, data)` returns a `Trajectory` (workflows/api.py), one row
    per episode, plus the per-episode columns of `EPISODE_KEYS` ([n] long).

    With tools, the first prompt is rendered again from the row's question (`instruction`,
    `system_prompt`: the dataset's) with the tools' schemas, and must stay within
    `max_prompt_tokens`.

    Raises (from `arun_episode`): ChatTemplateError (see `ChatDelta`), ValueError (a
    tools prompt over `max_prompt_tokens`), the engine's and the scorer's errors (the
    rollout controller counts the rollout as failed).
    """

    def __init__(self, *, make_env, gconfig: GenerationConfig, tokenizer, max_turns: int = 2,
                 max_tokens_per_turn: Optional[int] = None, max_total_tokens: int = 1024,
                 seed: Optional[int] = None, instruction: Optional[str] = None, system_prompt: Optional[str] = None,
                 max_prompt_tokens: Optional[int] = None):
        self.make_env, self.gconfig, self.tokenizer, self.seed = make_env, gconfig, tokenizer, seed
        self.max_turns = max_turns
        self.max_tokens_per_turn = max_tokens_per_turn or gconfig.max_new_tokens
        self.max_total_tokens = max_total_tokens
        self.instruction, self.system_prompt = instruction, system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.end_of_turn_id = tokenizer.eos_token_id
        self._deltas: dict[int, ChatDelta] = {}

    def _delta(self, env: Environment) -> ChatDelta:
        key = id(env.tools) if env.tools else 0
        if key not in self._deltas:
            self._deltas[key] = ChatDelta(self.tokenizer, self.end_of_turn_id, env.tools)
        return self._deltas[key]

    def _prompt_ids(self, data: dict, env: Environment) -> list[int]:
        if not env.tools:
            return list(data["prompt_ids"])
        # The tools' schemas go into the prompt the template writes (its system turn).
        from workflows.data.dataset import prompt_messages

        prompt = data.get("prompt")
        if isinstance(prompt, list):
            messages = prompt
        else:
            question = str(prompt if prompt is not None else data["question"])
            messages = (prompt_messages(question, self.instruction, self.system_prompt) if self.instruction
                        else prompt_messages(question, system_prompt=self.system_prompt))
        ids = render_ids(self.tokenizer, messages, tools=env.tools, add_generation_prompt=True)
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            # The trainer's shapes and the servers' max_model_len are sized by it.
            raise ValueError(f"the prompt with the tools' schemas is {len(ids)} tokens, above "
                             f"dataset.max_prompt_length={self.max_prompt_tokens}; raise it")
        return ids

    def _seed(self, data: dict, version: int, sample: int, turn: int) -> Optional[int]:
        if self.seed is None:
            return None
        # Turn 1 shares one seed per group (batched together, as RLVRWorkflow's); later
        # turns differ per sample, since their inputs do.
        return hash((self.seed, data["id"], version, 0 if turn == 1 else sample, turn)) % (2**31)

    async def run_one(self, engine: InferenceEngine, data: dict, *, sample: int = 0,
                      temperature: Optional[float] = None) -> Episode:
        """One episode (`temperature` overrides gconfig's: 0 is greedy at every turn)."""
        env = self.make_env()
        delta = self._delta(env)
        prompt_ids = self._prompt_ids(data, env)
        ep = Episode(list(prompt_ids), [0] * len(prompt_ids), [0.0] * len(prompt_ids), [-1] * len(prompt_ids))
        g = self.gconfig if temperature is None else dataclasses.replace(self.gconfig, temperature=temperature)
        version = engine.get_version()
        for turn in range(1, self.max_turns + 1):
            used = len(ep.input_ids) - len(prompt_ids)
            budget = min(self.max_tokens_per_turn, self.max_total_tokens - used)
            if budget <= 0:
                ep.over_budget = True
                break
            request = GenerationRequest.from_gconfig(ep.input_ids, g, seed=self._seed(data, version, sample, turn))
            request.max_new_tokens = budget
            response = await engine.agenerate(request)
            ep.append(response.output_ids, logprobs=response.output_logprobs, versions=response.output_versions)
            ep.num_turns = turn
            ep.last_text = self.tokenizer.decode(response.output_ids, skip_special_tokens=True)
            step = await env.step(ep.last_text, turn=turn, last=turn == self.max_turns, data=data)
            ep.tool_errors += step.tool_errors
            if step.done:
                ep.reward, ep.over_budget = step.reward, ep.over_budget or step.out_of_turns
                ep.solved_turn = turn if step.solved else 0
                break
            if turn == self.max_turns:  # an environment that never ends: out of turns
                ep.over_budget = True
                break
            # A turn cut by the budget (or ended by another stop token) is closed with the
            # end-of-turn token, which the policy did not sample: not trained.
            ended = bool(response.output_ids) and response.output_ids[-1] == self.end_of_turn_id
            appended = ([] if ended else [self.end_of_turn_id]) + delta(step.messages)
            if used + len(response.output_ids) + len(appended) >= self.max_total_tokens:
                ep.over_budget = True
                break
            ep.append(appended)
        return ep

    async def arun_episode(self, engine: InferenceEngine, data: dict) -> Optional[Trajectory]:
        episodes = await asyncio.gather(*(self.run_one(engine, data, sample=i) for i in range(self.gconfig.n_samples)))
        trajectory = pack_episodes(episodes, pad_token_id=self.tokenizer.pad_token_id)
        n = len(episodes)
        trajectory["prompt_id"] = torch.full((n,), int(data["id"]), dtype=torch.long)
        trajectory["epoch"] = torch.full((n,), int(data.get("epoch", 0)), dtype=torch.long)
        return trajectory

    async def aevaluate(self, engine: InferenceEngine, data: dict, *, temperature: float) -> tuple[str, bool, int]:
        """Held-out evaluation of one episode (workflows/training/evaluation.py): (the last
        turn's text, solved within `max_turns`, the turn that solved it or 0). Greedy
        evaluation (`temperature=0`) decodes every turn greedily; the feedback being
        fixed, the whole episode is then deterministic."""
        ep = await self.run_one(engine, data, temperature=temperature)
        return ep.last_text, ep.solved_turn > 0, ep.solved_turn


def pack_episodes(episodes: list[Episode], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad episodes into a `Trajectory`'s tensors (all but `prompt_id` and `epoch`)
    plus the `EPISODE_KEYS` columns."""
    out = pack_rows([e.input_ids for e in episodes], [e.loss_mask for e in episodes], [e.logprobs for e in episodes],
                    [e.versions for e in episodes], [e.reward for e in episodes], pad_token_id=pad_token_id)
    for key in EPISODE_KEYS:
        out[key] = torch.tensor([int(getattr(e, key)) for e in episodes], dtype=torch.long)
    return out


def episode_stats(sequences: dict[str, torch.Tensor]) -> dict[str, float]:
    """From a batch's per-episode columns ([B] each, `EPISODE_KEYS`; {} without them):
    `solved_turn_<t>`, the share of episodes solved at turn t, for t = 1 .. max(2, the
    most turns taken); `accuracy`, the share solved at any turn (a discounted reward
    below 1 is still a solved episode); `turns_mean`; `tool_errors` and `over_budget`
    (counts)."""
    if "solved_turn" not in sequences:
        return {}
    solved, turns = sequences["solved_turn"], sequences["num_turns"]
    n = max(int(solved.numel()), 1)
    stats = {f"solved_turn_{t}": float((solved == t).sum()) / n for t in range(1, max(2, int(turns.max())) + 1)}
    stats["accuracy"] = float((solved > 0).sum()) / n
    stats["turns_mean"] = float(turns.float().mean())
    stats["tool_errors"] = int(sequences["tool_errors"].sum())
    stats["over_budget"] = int(sequences["over_budget"].sum())
    return stats
