"""The reward: called as score(completion, reference, row=...) in a reward worker process."""
import re


def score(completion: str, reference: str, row: dict) -> float:
    """1.0 for the reversed word in \\boxed{}; 0.2 for its letters in another order."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    if not found:
        return 0.0
    answer = found[-1].strip().lower()
    if answer == reference:
        return 1.0
    return 0.2 if sorted(answer) == sorted(row["word"]) else 0.0
