"""Reading a reference answer out of a dataset column (`dataset.answer_format`), and the
final answer out of a completion. Plain string functions: the data loader and the reward
worker processes both use them, so this module imports nothing heavy."""

from __future__ import annotations

from typing import Any, Optional


def reference_answer(solution: Any) -> Optional[str]:
    """The text after the last `####` of a GSM8K solution, without thousands separators
    (`dataset.answer_format=gsm8k`); None without a `####` or an answer after it."""
    if not isinstance(solution, str) or "####" not in solution:
        return None
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return answer or None


def last_boxed(text: Any) -> Optional[str]:
    """The content of the last `\\boxed{...}` in `text` (nested braces kept, stripped),
    or None when there is none or its braces do not close."""
    if not isinstance(text, str):
        return None
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i].strip() or None
            depth -= 1
    return None


def raw_answer(value: Any) -> Optional[str]:
    """The column as it is, stripped (`dataset.answer_format=raw`); a number becomes its
    text; None for an empty value or another type."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    text = str(value).strip()
    return text or None


def any_answer(value: Any) -> Optional[str]:
    """`reference_answer` where the column has a `####`, else `raw_answer` (what
    `dataset.answer_format=null` reads: GSM8K's solutions and plain answers alike)."""
    if isinstance(value, str) and "####" in value:
        return reference_answer(value)
    return raw_answer(value)


# dataset.answer_format -> its reader; None (null) reads either format.
READERS = {"gsm8k": reference_answer, "boxed": last_boxed, "raw": raw_answer, None: any_answer}
