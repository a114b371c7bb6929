"""Prompt datasets for RL: rows to chat-templated prompts, held-out selection, batching.

Rows come from `workflows/data/sources.py` (local files, the hub, the shipped GSM8K, or
reasoning-gym). Each usable row becomes

    {"id": int, "prompt_ids": list[int], "prompt": str | list[dict], "question": str,
     "answer": str, "columns": dict}

`prompt_ids` is the chat-templated prompt (the tokenizer's chat template): the messages
of `dataset.messages_column` as they are, or an optional `dataset.system_prompt` and the
user message `dataset.instruction` with `{question}` replaced by the
`dataset.prompt_column` text. `prompt` is that column's value, `question` its text (the
messages' contents for a messages column), `answer` the reference read from
`dataset.answer_column` per `dataset.answer_format`, and `columns` every column of the
row (what reward functions get as `row`). Rows without a prompt or a reference, or whose
prompt is longer than `dataset.max_prompt_length` tokens, are skipped, counted and
reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from workflows.config import DEFAULT_INSTRUCTION, DatasetConfig
from workflows.data.answers import READERS, reference_answer
from workflows.data.sources import (
    PACKAGED_DATASETS,
    DatasetError,
    _has_prompt,
    answer_format,
    check_rows,
    load_raw_split,
    no_usable_rows,
    procedural_split,
)

__all__ = ["PACKAGED_DATASETS", "DatasetError", "PromptDataset", "PromptLoader", "TrainedPrompts", "build_prompt_ids",
           "held_out_rows", "load_eval_rows", "load_prompt_dataset", "load_raw_split", "procedural_split",
           "prompt_messages", "reference_answer"]

logger = logging.getLogger(__name__)

INSTRUCTION = DEFAULT_INSTRUCTION.replace("{question}\n", "")


def prompt_messages(question: str, instruction: str = DEFAULT_INSTRUCTION,
                    system_prompt: Optional[str] = None) -> list[dict]:
    """The chat messages of a prompt: `system_prompt` (if any), then `instruction` with
    `{question}` replaced by the stripped question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": instruction.replace("{question}", question.strip())}]


def build_prompt_ids(tokenizer, question: Any, instruction: str = DEFAULT_INSTRUCTION,
                     system_prompt: Optional[str] = None) -> list[int]:
    """Chat-template a prompt (a question, or a list of chat messages taken as they are)
    with the generation prompt appended; token ids."""
    messages = question if isinstance(question, list) else prompt_messages(question, instruction, system_prompt)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


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
    """Load, validate and tokenise a split (the row format is in the module docstring).

    Raises:
        DatasetError: the split cannot be read, has no rows or lacks the configured
            columns, or no usable row is left (no prompt or reference, all too long).
        HubError: see `load_raw_split`.
    """
    split = split or cfg.split
    raw = load_raw_split(cfg, split)
    check_rows(cfg, raw, split)
    read = READERS[answer_format(cfg)]
    prompt_key = cfg.messages_column or cfg.prompt_column
    out = PromptDataset(rows=[], split=split)
    for index, row in enumerate(raw):
        prompt, answer = row.get(prompt_key), read(row.get(cfg.answer_column))
        if not _has_prompt(prompt, bool(cfg.messages_column)) or answer is None:
            out.num_malformed += 1
            if len(out.skipped_examples) < 3:
                out.skipped_examples.append(f"row {index}: {str(row)[:120]}")
            continue
        prompt_ids = build_prompt_ids(tokenizer, prompt, cfg.instruction, cfg.system_prompt)
        if len(prompt_ids) > cfg.max_prompt_length:
            out.num_too_long += 1
            continue
        question = "\n".join(m["content"] for m in prompt) if isinstance(prompt, list) else prompt
        out.rows.append({"id": index, "prompt_ids": prompt_ids, "prompt": prompt, "question": question,
                         "answer": answer, "columns": dict(row)})
    if out.num_malformed or out.num_too_long:
        logger.warning("%s%s", out.report(), "".join(f"\n  e.g. {e}" for e in out.skipped_examples))
    if not out.rows:
        if out.num_malformed == len(raw):
            raise DatasetError(no_usable_rows(cfg, split, raw[0]))
        raise DatasetError(f"dataset.path={cfg.path!r} split {split!r} has no usable rows ({out.report()}); raise "
                           "dataset.max_prompt_length or shorten the prompts")
    return out


def held_out_rows(eval_rows: list[dict], train_rows: list[dict]) -> tuple[list[dict], int]:
    """`eval_rows` without any whose question is also a training question; and how many
    were dropped."""
    seen = {row["question"] for row in train_rows}
    kept = [row for row in eval_rows if row["question"] not in seen]
    return kept, len(eval_rows) - len(kept)


def load_eval_rows(cfg: DatasetConfig, tokenizer, train_rows: Optional[list[dict]] = None) -> tuple[list[dict], int]:
    """The held-out prompts of `cfg.eval_split` (at most `cfg.max_eval_samples`), none of
    whose questions is in the training split; and how many were left out for that.
    `train_rows` are the training split's rows when the caller has them loaded already.

    Raises:
        ValueError: a split has no usable row (see `load_prompt_dataset`).
    """
    if train_rows is None:
        train_rows = load_prompt_dataset(cfg, tokenizer).rows
    rows, overlap = held_out_rows(load_prompt_dataset(cfg, tokenizer, split=cfg.eval_split).rows, train_rows)
    return rows[: cfg.max_eval_samples], overlap


class TrainedPrompts:
    """Which prompts have been trained, per epoch: the data position of a run.

    A prompt is identified within an epoch by `(epoch, id)` (`id` is the row's `"id"`, its
    index in the raw split). The trainer adds the ids of every batch right after the
    optimizer step, so at a checkpoint this holds exactly the prompts whose gradient is in
    the saved weights, whatever the rollout controller had already pulled from the loader
    (in asynchronous mode it runs up to `max_head_offpolicyness` batches ahead).

    Only epochs that are not yet complete keep their ids ("open" epochs): an epoch closes
    when all `epoch_size` of its prompts are trained. An epoch with a prompt that was never
    trained (its rollout was rejected or expired) stays open, so a resumed run regenerates
    that prompt once; it is never trained twice. Epochs below `next_epoch` that are not
    open are complete; no prompt of an epoch `>= next_epoch` has been trained.

    Args:
        epoch_size: prompts trained per complete epoch (`PromptLoader.epoch_size`).
    """

    def __init__(self, epoch_size: int):
        if epoch_size < 1:
            raise ValueError(f"epoch_size must be >= 1, got {epoch_size}")
        self.epoch_size = epoch_size
        self.next_epoch = 0
        self._open: dict[int, set[int]] = {}

    def add(self, epoch: int, prompt_id: int) -> bool:
        """Mark `prompt_id` of `epoch` trained; False (and nothing changes) if it already was.

        Raises:
            ValueError: if `epoch < 0`.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch < self.next_epoch and epoch not in self._open:
            return False  # a complete epoch: every prompt of it is already trained
        for e in range(self.next_epoch, epoch + 1):
            # Epochs skipped over (none of their prompts trained yet) stay open too.
            self._open.setdefault(e, set())
        self.next_epoch = max(self.next_epoch, epoch + 1)
        trained = self._open[epoch]
        if prompt_id in trained:
            return False
        trained.add(prompt_id)
        if len(trained) >= self.epoch_size:
            del self._open[epoch]
        return True

    def update(self, pairs) -> list[tuple[int, int]]:
        """`add` every `(epoch, prompt_id)`; returns the pairs that were already trained."""
        return [(int(e), int(i)) for e, i in pairs if not self.add(int(e), int(i))]

    def is_trained(self, epoch: int, prompt_id: int) -> bool:
        if epoch in self._open:
            return prompt_id in self._open[epoch]
        return epoch < self.next_epoch

    @property
    def open_epochs(self) -> dict[int, frozenset[int]]:
        """`{epoch: ids trained so far}` for every incomplete epoch below `next_epoch`."""
        return {e: frozenset(ids) for e, ids in sorted(self._open.items())}

    def state_dict(self) -> dict:
        """JSON-ready: `{"epoch_size", "next_epoch", "open": {"<epoch>": sorted ids}}`."""
        return {
            "epoch_size": self.epoch_size,
            "next_epoch": self.next_epoch,
            "open": {str(e): sorted(ids) for e, ids in sorted(self._open.items())},
        }

    @classmethod
    def from_state_dict(cls, state: dict, epoch_size: Optional[int] = None) -> "TrainedPrompts":
        """Rebuild from `state_dict()`; `epoch_size` (default: the stored one) decides when
        an epoch is complete from now on.

        Raises:
            ValueError: on a malformed state.
        """
        try:
            out = cls(int(epoch_size if epoch_size is not None else state["epoch_size"]))
            out.next_epoch = int(state["next_epoch"])
            out._open = {int(e): {int(i) for i in ids} for e, ids in state["open"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed data position {str(state)[:200]!r}: {exc}") from exc
        if any(e >= out.next_epoch or e < 0 for e in out._open):
            raise ValueError(f"data position has open epochs {sorted(out._open)} outside [0, {out.next_epoch})")
        return out


class PromptLoader:
    """Batches of prompt rows, reshuffled each epoch from `seed + epoch`.

    `batch_size` is the global batch; with `world_size > 1` each rank gets rows
    `rank, rank + world_size, ...` of every global batch, so the ranks together see
    exactly what one process would. Every yielded row is a copy of the dataset row with
    `"epoch"` added (the epoch it was drawn in, from 0), so that a trained prompt can be
    told apart from the same prompt of the next epoch.

    After `resume(trained)` the loader first re-iterates each open epoch of `trained` in
    the same order as before (same `seed + epoch`) without the prompts already trained,
    then continues with the epochs after `trained.next_epoch`. Every rank applies the same
    skip to the same global order, so the ranks together still see each untrained prompt
    exactly once. A resumed epoch's last batch may be short.

    Raises:
        DatasetError: a batch larger than the dataset (a ValueError).
        ValueError: a batch not divisible by `world_size`.
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
            raise DatasetError(f"dataset.batch_size={batch_size} exceeds the {len(dataset)} usable prompts of the "
                               f"{dataset.split!r} split; lower dataset.batch_size or add rows")
        if batch_size % world_size:
            raise ValueError(f"dataset.batch_size={batch_size} must be a multiple of the {world_size} replicas")
        self.dataset, self.batch_size, self.shuffle, self.seed, self.drop_last = dataset, batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0  # the next epoch a fresh iteration starts
        self._resume_plan: list[tuple[int, frozenset[int]]] = []

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def steps_per_epoch(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def epoch_size(self) -> int:
        """Prompts (all ranks together) yielded in one full epoch."""
        return min(len(self.dataset), self.steps_per_epoch() * self.batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """Row indices (into `dataset.rows`) of `epoch`, in the order they are yielded."""
        order = list(range(len(self.dataset)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(order), generator=generator).tolist()
        return order[: self.epoch_size]

    def resume(self, trained: TrainedPrompts) -> None:
        """Continue after the prompts in `trained` (see the class docstring).

        Takes effect at the next `iter(loader)`.
        """
        self._resume_plan = sorted(trained.open_epochs.items())
        self.epoch = trained.next_epoch

    def __iter__(self) -> Iterator[list[dict]]:
        if self._resume_plan:
            epoch, skip = self._resume_plan.pop(0)
        else:
            epoch, skip = self.epoch, frozenset()
            self.epoch += 1
        rows = self.dataset.rows
        order = [i for i in self.epoch_order(epoch) if rows[i]["id"] not in skip]
        return self._batches(order, epoch)

    def _batches(self, order: list[int], epoch: int) -> Iterator[list[dict]]:
        for start in range(0, len(order), self.batch_size):
            local = order[start : start + self.batch_size][self.rank :: self.world_size]
            if local:
                yield [{**self.dataset.rows[i], "epoch": epoch} for i in local]
