"""GSM8K prompts for RL: loading, prompt formatting and batching.

Rows come from the hub (`datasets.load_dataset("openai/gsm8k", "main")`) or from a local
directory or file of `.jsonl` / `.parquet`. Each usable row becomes

    {"id": int, "prompt_ids": list[int], "question": str, "answer": str}

where `answer` is the reference number after `####` in GSM8K's solution text. Rows that
lack a question or a `####` answer, or whose prompt is longer than
`dataset.max_prompt_length` tokens, are skipped, counted and reported.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import datasets
import torch

from workflows.config import DatasetConfig

logger = logging.getLogger(__name__)

INSTRUCTION = "Solve the problem step by step, then give the final answer as a number in \\boxed{}."
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def reference_answer(solution: str) -> Optional[str]:
    """The number after `####` in a GSM8K solution, without thousands separators."""
    if not isinstance(solution, str) or "####" not in solution:
        return None
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return answer or None


def build_prompt_ids(tokenizer, question: str) -> list[int]:
    """Chat-template the question with the boxed-answer instruction; token ids."""
    messages = [{"role": "user", "content": f"{question.strip()}\n{INSTRUCTION}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def load_raw_split(cfg: DatasetConfig, split: str) -> datasets.Dataset:
    """Read one split from the hub or from local files.

    For a local directory, the files whose names start with `split` (e.g. `train.jsonl`,
    `train-00000.parquet`) are read. Raises FileNotFoundError when none match.
    """
    path = Path(cfg.path)
    if path.exists():
        files = [path] if path.is_file() else sorted(
            p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.name.startswith(split)
        )
        if not files:
            raise FileNotFoundError(f"dataset.path={cfg.path!r} has no {split}*.jsonl or {split}*.parquet files")
        builder = DATA_SUFFIXES[files[0].suffix]
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    return datasets.load_dataset(cfg.path, cfg.name, split=split)


@dataclass
class PromptDataset:
    """Tokenised prompts of one split, with a report of what was skipped."""

    rows: list[dict]
    num_malformed: int = 0
    num_too_long: int = 0
    split: str = "train"
    skipped_examples: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def report(self) -> str:
        return (
            f"{self.split}: {len(self.rows)} prompts; skipped {self.num_malformed} malformed rows"
            f" and {self.num_too_long} over max_prompt_length"
        )


def load_prompt_dataset(cfg: DatasetConfig, tokenizer, split: Optional[str] = None) -> PromptDataset:
    """Load, validate and tokenise a split.

    Raises:
        ValueError: no usable row is left (empty file, wrong columns, all too long).
    """
    split = split or cfg.split
    raw = load_raw_split(cfg, split)
    out = PromptDataset(rows=[], split=split)
    for index, row in enumerate(raw):
        question, answer = row.get("question"), reference_answer(row.get("answer"))
        if not isinstance(question, str) or not question.strip() or answer is None:
            out.num_malformed += 1
            if len(out.skipped_examples) < 3:
                out.skipped_examples.append(f"row {index}: {str(row)[:120]}")
            continue
        prompt_ids = build_prompt_ids(tokenizer, question)
        if len(prompt_ids) > cfg.max_prompt_length:
            out.num_too_long += 1
            continue
        out.rows.append({"id": index, "prompt_ids": prompt_ids, "question": question, "answer": answer})
    if out.num_malformed or out.num_too_long:
        logger.warning("%s%s", out.report(), "".join(f"\n  e.g. {e}" for e in out.skipped_examples))
    if not out.rows:
        raise ValueError(
            f"dataset.path={cfg.path!r} split {split!r} has no usable rows ({out.report()}); "
            "GSM8K rows need a 'question' and an 'answer' ending in '#### <number>'"
        )
    return out


class PromptLoader:
    """Batches of prompt rows, reshuffled each epoch from `seed + epoch`.

    `batch_size` is the global batch; with `world_size > 1` each rank gets rows
    `rank, rank + world_size, ...` of every global batch, so the ranks together see
    exactly what one process would.

    Raises:
        ValueError: a batch larger than the dataset, or not divisible by `world_size`.
    """

    def __init__(
        self,
        dataset: PromptDataset,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size > len(dataset):
            raise ValueError(f"dataset.batch_size={batch_size} exceeds the {len(dataset)} prompts available")
        if batch_size % world_size:
            raise ValueError(f"dataset.batch_size={batch_size} must be a multiple of the {world_size} replicas")
        self.dataset, self.batch_size, self.shuffle, self.seed, self.drop_last = dataset, batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def steps_per_epoch(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[dict]]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(order), generator=generator).tolist()
        self.epoch += 1
        for start in range(0, self.steps_per_epoch() * self.batch_size, self.batch_size):
            batch = order[start : start + self.batch_size]
            yield [self.dataset.rows[i] for i in batch[self.rank :: self.world_size]]
