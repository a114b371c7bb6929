"""`reward.fn=llm_judge`: an LLM grades each completion through an OpenAI-compatible chat
endpoint (`vllm serve`, SGLang, or any provider), as a reward function.

The judge is a picklable callable (`LLMJudge`): the reward process pool of
workflows/rollout/reward.py runs it like any reward function, under its own deadline
(`LLMJudge.deadline`, long enough for every retry). It fills `reward.judge.rubric` with the
row's question, the completion and the reference, sends it with the `openai` client
(`AsyncOpenAI.chat.completions.create`), reads the grade with `reward.judge.grade_pattern`
and scales it from [min_grade, max_grade] to [0, 1].

Failures are counted like those of any reward function, and never score a silent 0: a
request that times out, cannot connect, or gets a 429 / 5xx answer is retried
`max_retries` times with exponential backoff (`backoff`, then twice as long each time);
when the retries are spent, or the answer is no chat completion, has no grade, or a grade
outside the range, the judge raises `JudgeError`, which fails the rollout
(`RewardFunctionError`, counted in `reward_failures`) so a broken judge stops the run
(`rollout.max_consecutive_rejections`) instead of training on zeros.

The API key. The config names the environment variable that holds it
(`reward.judge.api_key_env`), never the key; a worker reads it when it calls, so it is in
no pickled task, config, log or command line, and any text the server echoes back is
cleaned of it before it reaches an error message.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import re
import string
from dataclasses import dataclass
from typing import Any, Optional

from workflows.config import JudgeConfig

PLACEHOLDERS = ("question", "completion", "reference")
# The key of the call in progress, so that every text quoted from the server is cleaned of
# it before it is cut short (a cut could leave part of it).
_KEY: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("judge_api_key", default=None)


class JudgeError(RuntimeError):
    """The judge gave no grade: its server failed after every retry, refused the request,
    or answered something that is no chat completion with a grade in range. One line; it
    names the URL and never holds the API key."""


def rubric_fields(template: str) -> set[str]:
    """The `{name}` placeholders of `template`.

    Raises:
        ValueError: unbalanced braces, or a placeholder with a format spec / index.
    """
    names = set()
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if spec or conversion or not name.isidentifier():
            raise ValueError(f"the placeholder {{{name}}} is not one of {{question}}, {{completion}}, {{reference}}")
        names.add(name)
    return names


def question_text(prompt: Any, row: Optional[dict]) -> str:
    """The text of the row's question: the prompt column's text, or the last user message of
    a chat `messages` prompt; else the row's `question` column, else ''."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return str(users[-1])
    return str((row or {}).get("question", ""))


@dataclass(frozen=True)
class LLMJudge:
    """A reward function (workflows/api.py's `RewardFn`, async) asking an LLM for a grade.

    `await judge(completion, reference, prompt=..., row=...)` returns the grade scaled to
    [0, 1]: (grade - min_grade) / (max_grade - min_grade).

    Raises:
        JudgeError: see the module docstring.
    """

    settings: JudgeConfig

    @property
    def deadline(self) -> float:
        """Seconds one call may take at most, in seconds: every attempt's timeout (and one
        more for asking the server for its model, when `model` is null) plus every backoff."""
        s = self.settings
        attempts = s.max_retries + 1
        waits = sum(s.backoff * 2**i for i in range(s.max_retries))
        return (attempts * (2 if s.model is None else 1)) * s.timeout + waits + 5.0

    def messages(self, completion: str, reference: str, prompt: Any = None, row: Optional[dict] = None) -> list[dict]:
        s = self.settings
        text = s.rubric.format(question=question_text(prompt, row), completion=completion, reference=reference)
        return ([{"role": "system", "content": s.system_prompt}] if s.system_prompt else []) + [
            {"role": "user", "content": text}
        ]

    def grade(self, reply: str) -> float:
        """The reply's grade (the last match of `grade_pattern`) scaled to [0, 1].

        Raises:
            JudgeError: no grade in the reply, or one outside [min_grade, max_grade].
        """
        s = self.settings
        found = re.findall(s.grade_pattern, reply)
        if not found:
            raise JudgeError(f"the judge at {s.base_url} replied with no grade matching reward.judge.grade_pattern: "
                             f"{_snippet(reply)}")
        last = found[-1][0] if isinstance(found[-1], tuple) else found[-1]
        try:
            value = float(last)
        except ValueError:
            raise JudgeError(f"the judge at {s.base_url} graded {_snippet(last)}, which is no number") from None
        if not s.min_grade <= value <= s.max_grade:
            raise JudgeError(f"the judge at {s.base_url} graded {value:g}, outside reward.judge.min_grade.."
                             f"max_grade [{s.min_grade:g}, {s.max_grade:g}]")
        return (value - s.min_grade) / (s.max_grade - s.min_grade)

    async def __call__(self, completion: str, reference: str, *, prompt: Any = None, row: Optional[dict] = None) -> float:
        key = os.environ.get(self.settings.api_key_env) if self.settings.api_key_env else None
        token = _KEY.set(key)
        try:
            return await self._ask(completion, reference, prompt, row, key)
        except JudgeError as exc:
            raise JudgeError(_redact(str(exc))) from None
        finally:
            _KEY.reset(token)

    async def _ask(self, completion: str, reference: str, prompt: Any, row: Optional[dict], key: Optional[str]) -> float:
        import openai

        s = self.settings
        if s.api_key_env and not key:
            raise JudgeError(f"reward.judge.api_key_env={s.api_key_env} names an environment variable that is not "
                             "set in the reward workers")
        # The client's own retries are off: ours count attempts and back off as configured.
        async with openai.AsyncOpenAI(base_url=s.base_url, api_key=key or "none", timeout=s.timeout,
                                      max_retries=0) as client:
            model = s.model or await self._retrying(lambda: _first_model(client, s.base_url))
            response = await self._retrying(lambda: client.chat.completions.create(
                model=model, messages=self.messages(completion, reference, prompt, row),
                temperature=s.temperature, max_tokens=s.max_tokens,
            ))
        try:
            reply = response.choices[0].message.content
        except (AttributeError, IndexError, KeyError, TypeError):
            reply = None
        if not isinstance(reply, str):
            raise JudgeError(f"the judge at {s.base_url} answered no chat completion: {_snippet(str(response))}")
        return self.grade(reply)

    async def _retrying(self, request):
        import openai

        s = self.settings
        for attempt in range(s.max_retries + 1):
            try:
                return await request()
            except (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
                    openai.InternalServerError) as exc:
                what = (f"timed out after {s.timeout:g}s" if isinstance(exc, openai.APITimeoutError)
                        else f"failed ({_describe(exc)})")
                if attempt == s.max_retries:
                    raise JudgeError(f"the judge at {s.base_url} {what} on all {s.max_retries + 1} attempts") from None
                await asyncio.sleep(s.backoff * 2**attempt)
            except openai.APIStatusError as exc:
                raise JudgeError(f"the judge at {s.base_url} refused the request ({_describe(exc)})") from None
            except openai.OpenAIError as exc:
                # Not the OpenAI schema (a body that is no JSON, say): retrying would not help.
                raise JudgeError(f"the judge at {s.base_url} answered no chat completion ({_describe(exc)})") from None
        raise AssertionError("unreachable")


async def _first_model(client, base_url: str) -> str:
    page = await client.models.list()
    ids = [m.id for m in getattr(page, "data", None) or [] if getattr(m, "id", None)]
    if not ids:
        raise JudgeError(f"the judge at {base_url} lists no model (/models); set reward.judge.model")
    return ids[0]


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    return f"HTTP {status}: {_snippet(str(exc))}" if status else f"{type(exc).__name__}: {_snippet(str(exc))}"


def _snippet(text: str, limit: int = 120) -> str:
    one_line = _redact(" ".join(str(text).split()))
    return repr(one_line if len(one_line) <= limit else one_line[:limit] + "...")


def _redact(text: str) -> str:
    key = _KEY.get()
    return text.replace(key, "<api key>") if key else text
