"""Multi-turn episodes on exact tokens: a tiny random model, a chat template with tools,
the sandboxed python tool, retry with feedback, budgets, and the staleness count."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from engines.config import ActorConfig, GenerationConfig
from engines.inference import GenerationResponse, LocalInferenceEngine
from engines.train_engine import TrainEngine
from workflows.config import RolloutConfig
from workflows.controller.executor import WorkflowExecutor
from workflows.rollout.environments import RetryEnvironment, ToolEnvironment
from workflows.rollout.multiturn import EPISODE_KEYS, ChatDelta, ChatTemplateError, MultiTurnWorkflow, episode_stats
from workflows.rollout.sandbox import SandboxLimits
from workflows.rollout.tools import ToolRegistry, load_tools

# A ChatML template with tools in the Hermes style: the schemas in the system turn, tool
# results in their own turn.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these tools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOL_CALL = '<tool_call>{"name": "python", "arguments": {"code": "print(6 * 7)"}}</tool_call>'


class ContainsScorer:
    """Right (1.0) when the reference answer appears in the completion; records calls."""

    def __init__(self, script: list[float] | None = None):
        self.script = list(script or [])
        self.calls = 0

    async def ascore(self, completion, reference, *, prompt=None, row=None) -> float:
        self.calls += 1
        if self.script:
            return self.script.pop(0)
        return float(reference in completion)


class ScriptedFirstTurn:
    """The real engine, except that each episode's first turn is `script` (a random model
    would not write a tool call), scored teacher-forced by the same model: its logprobs are
    the model's own. A weight update (version + 1) happens after the first turns, so the
    later turns carry the next version."""

    def __init__(self, inner: LocalInferenceEngine, model, script_ids: list[int], prompt_len: int):
        self.inner, self.model, self.script_ids, self.prompt_len = inner, model, script_ids, prompt_len
        self.first_version = inner.get_version()
        self.responses: list[GenerationResponse] = []

    def get_version(self) -> int:
        return self.inner.get_version()

    async def agenerate(self, request) -> GenerationResponse:
        if len(request.input_ids) == self.prompt_len:
            ids = torch.tensor([request.input_ids + self.script_ids])
            with torch.no_grad():
                logits = self.model(input_ids=ids).logits[0, self.prompt_len - 1 : -1].float()
            logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(self.script_ids)[:, None])[:, 0]
            response = GenerationResponse(list(request.input_ids), list(self.script_ids), logp.tolist(),
                                          [self.first_version] * len(self.script_ids), "stop")
            self.inner.set_version(self.first_version + 1)
        else:
            response = await self.inner.agenerate(request)
        self.responses.append(response)
        return response


@pytest.fixture
def tool_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    return tok


def test_tool_episode_trains_exactly_the_sampled_and_appended_ids(tiny_model, tool_tokenizer):
    tok = tool_tokenizer
    registry = ToolRegistry(load_tools(["python"]), SandboxLimits(wall_seconds=20))
    scorer = ContainsScorer()
    workflow = MultiTurnWorkflow(
        make_env=lambda: ToolEnvironment(scorer, registry), gconfig=GenerationConfig(n_samples=2, max_new_tokens=6),
        tokenizer=tok, max_turns=2, max_total_tokens=200,
    )
    row = {"id": 5, "epoch": 1, "prompt": "What is 6 times 7?", "question": "What is 6 times 7?", "answer": "42",
           "prompt_ids": []}
    env = workflow.make_env()
    prompt = workflow._prompt_ids(row, env)
    assert '"name": "python"' in tok.decode(prompt)  # the tool's schema reached the prompt
    script = tok.encode(TOOL_CALL, add_special_tokens=False) + [tok.eos_token_id]
    # The sampler decodes from the trainer's own model (synchronous RL), which trains below.
    inner = LocalInferenceEngine(tiny_model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 shares_weights=True)
    inner.set_version(3)
    engine = ScriptedFirstTurn(inner, tiny_model, script, len(prompt))
    try:
        t = asyncio.run(workflow.arun_episode(engine, row))
    finally:
        inner.destroy()

    expected_appended = "\n<|im_start|>tool\n42\n<|im_end|>\n<|im_start|>assistant\n"
    second_turns = [r for r in engine.responses if len(r.input_ids) > len(prompt)]
    assert len(second_turns) == 2 and t["input_ids"].shape[0] == 2
    for i in range(2):
        length = int(t["attention_mask"][i].sum())
        ids = t["input_ids"][i, :length].tolist()
        # The training ids are exactly prompt + sampled + appended + sampled, nothing re-tokenised.
        second = second_turns[i] if ids == second_turns[i].input_ids + second_turns[i].output_ids else second_turns[1 - i]
        appended = second.input_ids[len(prompt) + len(script):]
        assert ids == prompt + script + appended + second.output_ids
        assert tok.decode(appended) == expected_appended  # the tool's real output, in the template's format
        mask = t["loss_mask"][i, :length].tolist()
        a, b = len(prompt) + len(script), len(second.input_ids)
        assert mask == [0] * len(prompt) + [1] * len(script) + [0] * (b - a) + [1] * len(second.output_ids)
        assert t["logprobs"][i, a:b].eq(0).all() and t["versions"][i, a:b].eq(-1).all()
        # A weight update between the turns: the episode has two versions.
        assert t["versions"][i, len(prompt):a].eq(3).all() and t["versions"][i, b:length].eq(4).all()
        assert torch.allclose(t["logprobs"][i, b:length], torch.tensor(second.output_logprobs))
    assert t["num_turns"].tolist() == [2, 2] and t["tool_errors"].tolist() == [0, 0]
    # The trainer's logprobs of every trained token (scripted and sampled) match the sampler's.
    trainer = TrainEngine(ActorConfig(), tiny_model, total_steps=1, max_sequence_tokens=t["input_ids"].shape[1],
                          temperature=1.0)
    recomputed = trainer.compute_logp({k: t[k] for k in ("input_ids", "attention_mask", "loss_mask")})
    trained = t["loss_mask"].bool()
    assert torch.allclose(recomputed[trained], t["logprobs"][trained], atol=1e-4)


def test_retry_episode_appends_feedback_and_discounts_the_second_turn(tiny_model, tokenizer):
    scorer = ContainsScorer(script=[0.0, 1.0])  # wrong, then right
    feedback = "Wrong; try again."
    workflow = MultiTurnWorkflow(
        make_env=lambda: RetryEnvironment(scorer, turn_discount=0.5, feedback=feedback),
        gconfig=GenerationConfig(n_samples=1, max_new_tokens=5), tokenizer=tokenizer, max_turns=3,
        max_total_tokens=100,
    )
    prompt = ChatDelta(tokenizer, tokenizer.eos_token_id).prefix  # any ChatML prompt will do
    prompt = prompt + tokenizer.encode("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
                                       add_special_tokens=False)
    engine = LocalInferenceEngine(tiny_model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    try:
        t = asyncio.run(workflow.arun_episode(engine, {"id": 1, "prompt_ids": prompt, "answer": "4"}))
    finally:
        engine.destroy()
    assert t["rewards"].tolist() == [0.5] and t["solved_turn"].tolist() == [2] and t["num_turns"].tolist() == [2]
    length = int(t["attention_mask"][0].sum())
    mask = t["loss_mask"][0, :length].tolist()
    # prompt (0), turn 1 (1), appended (0), turn 2 (1): exactly two trained runs
    runs = [k for k in range(1, length) if mask[k] != mask[k - 1]]
    assert len(runs) == 3 and mask[-1] == 1
    appended = tokenizer.decode(t["input_ids"][0, runs[1]: runs[2]])
    assert appended.endswith(f"<|im_start|>user\n{feedback}<|im_end|>\n<|im_start|>assistant\n")
    stats = episode_stats({k: t[k] for k in EPISODE_KEYS})
    assert stats["solved_turn_1"] == 0.0 and stats["solved_turn_2"] == 1.0


def test_a_token_budget_ends_the_episode_with_its_reward_so_far(tiny_model, tokenizer):
    workflow = MultiTurnWorkflow(
        make_env=lambda: RetryEnvironment(ContainsScorer(script=[0.0] * 10)),
        gconfig=GenerationConfig(n_samples=2, max_new_tokens=8), tokenizer=tokenizer, max_turns=5,
        max_tokens_per_turn=8, max_total_tokens=20,
    )
    prompt = tokenizer.encode("<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    engine = LocalInferenceEngine(tiny_model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    try:
        t = asyncio.run(workflow.arun_episode(engine, {"id": 2, "prompt_ids": prompt, "answer": "2"}))
    finally:
        engine.destroy()
    assert t["over_budget"].tolist() == [1, 1] and t["rewards"].tolist() == [0.0, 0.0]
    assert (t["attention_mask"].sum(dim=1) - len(prompt)).le(20).all()
    assert t["num_turns"].max() < 5


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    # Drops every assistant turn but the last, as templates that strip old reasoning do.
    tok.chat_template = (
        "{%- for m in messages %}{% if m.role != 'assistant' or loop.last %}<|im_start|>{{ m.role }}\n"
        "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}"
    )
    delta = ChatDelta(tok, tok.eos_token_id)
    with pytest.raises(ChatTemplateError, match="renders earlier turns differently"):
        delta([{"role": "user", "content": "again"}])


def test_tool_errors_are_reported_to_the_model_and_counted():
    def add(a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: The first.
            b: The second.
        """
        return a + b

    registry = ToolRegistry({"add": add}, SandboxLimits(wall_seconds=5))
    env = ToolEnvironment(ContainsScorer(), registry)
    text = ('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
            '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>{not json}</tool_call>')
    step = asyncio.run(env.step(text, turn=1, last=False, data={"answer": "5"}))
    assert [m["content"] for m in step.messages][0] == "5" and step.tool_errors == 2
    assert "no tool named 'nope'" in step.messages[1]["content"] and "not valid JSON" in step.messages[2]["content"]
    assert registry.schemas[0]["function"]["parameters"]["required"] == ["a", "b"]
    last = asyncio.run(env.step(text, turn=2, last=True, data={"answer": "5"}))
    assert last.done and last.out_of_turns and last.reward == 0.0


def test_the_staleness_budget_counts_a_multi_turn_episode_once(tiny_model, tokenizer):
    workflow = MultiTurnWorkflow(
        make_env=lambda: RetryEnvironment(ContainsScorer(script=[0.0] * 20)),
        gconfig=GenerationConfig(n_samples=2, max_new_tokens=4), tokenizer=tokenizer, max_turns=3,
        max_total_tokens=200,
    )
    prompt = tokenizer.encode("<|im_start|>user\n3+4?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    engine = LocalInferenceEngine(tiny_model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    executor = WorkflowExecutor(RolloutConfig(max_concurrent_rollouts=4, max_head_offpolicyness=0), engine,
                                consumer_batch_size=2)
    executor.initialize()
    try:
        for i in range(2):
            executor.submit({"id": i, "prompt_ids": prompt, "answer": "7"}, workflow)
        batch = executor.wait(2, timeout=120)
        stats = executor.staleness_manager.get_stats()
    finally:
        executor.destroy()
        engine.destroy()
    assert batch["num_turns"].tolist() == [3, 3, 3, 3]  # each episode took three turns...
    assert stats.accepted == 2 and stats.enqueued + stats.running == 0  # ...and counts once


def test_held_out_evaluation_runs_whole_greedy_episodes(tiny_model, tokenizer):
    from workflows.training.evaluation import evaluate_rows

    scorer = ContainsScorer(script=[0.0, 1.0, 1.0])  # prompt 0: wrong then right; prompt 1: right at once
    workflow = MultiTurnWorkflow(
        make_env=lambda: RetryEnvironment(scorer), gconfig=GenerationConfig(n_samples=1, max_new_tokens=4),
        tokenizer=tokenizer, max_turns=2, max_total_tokens=100,
    )
    prompt = tokenizer.encode("<|im_start|>user\n5+5?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    rows = [{"id": i, "prompt_ids": prompt, "answer": "10"} for i in range(2)]
    engine = LocalInferenceEngine(tiny_model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    try:
        report = asyncio.run(evaluate_rows(engine, scorer, tokenizer, rows, workflow.gconfig, n_samples=0,
                                           pass_k=[1], concurrency=1, workflow=workflow))
    finally:
        engine.destroy()
    assert report["accuracy"] == 1.0 and report["accuracy_turn_1"] == 0.5  # solved within two turns, one at the first
    assert sorted(p["greedy_solved_turn"] for p in report["prompts"]) == [1, 2] and scorer.calls == 3
