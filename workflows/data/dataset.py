"""GSM8K prompts for RL: loading, prompt formatting and batching.

Rows come from a local directory or file of `.jsonl` / `.parquet`, or from the hub
(`datasets.load_dataset("openai/gsm8k", "main")`). When the hub cannot be reached, a hub id
that `PACKAGED_DATASETS` knows is read from the copy shipped with the package: GSM8K's
train and test splits (OpenAI, MIT licence, `workflows/data/gsm8k/LICENSE`). Each usable
row becomes

    {"id": int, "prompt_ids": list[int], "question": str, "answer": str}

where `answer` is the reference number after `####` in GSM8K's solution text. Rows that
lack a question or a `####` answer, or whose prompt is longer than
`dataset.max_prompt_length` tokens, are skipped, counted and reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import datasets
import torch
from datasets.exceptions import DatasetNotFoundError

from engines.hub import hub_reachable, refused_error, unreachable_error
from workflows.config import DatasetConfig

logger = logging.getLogger(__name__)

INSTRUCTION = "Solve the problem step by step, then give the final answer as a number in \\boxed{}."
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# hub id -> the copy shipped as package data (its default config, "main"), read offline.
PACKAGED_DATASETS = {"openai/gsm8k": Path(__file__).resolve().parent / "gsm8k"}
_warned_packaged: set[str] = set()


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


PROCEDURAL_PREFIX = "reasoning_gym:"
SPLIT_SEED_OFFSET = 2**31  # held-out splits of a procedural task: seeds apart from train's


def procedural_split(cfg: DatasetConfig, split: str) -> datasets.Dataset:
    """`cfg.task_size` problems of the reasoning-gym task named after `reasoning_gym:`,
    in GSM8K's columns (`question`, `answer` ending in `#### <answer>`). reasoning-gym
    draws problem i from seed `seed + i`, so the splits take seeds `task_seed` (train)
    and `task_seed + 2**31` (any other split): seed ranges that never overlap. A
    held-out question that the training split also drew by chance is left out of
    evaluation (workflows/training/evaluation.py).

    Raises:
        ImportError: reasoning-gym is not installed (`pip install reasoning-gym`).
        ValueError: an unknown task or task argument.
    """
    import reasoning_gym

    task = cfg.path[len(PROCEDURAL_PREFIX):]
    seed = cfg.task_seed + (0 if split == "train" else SPLIT_SEED_OFFSET)
    try:
        problems = reasoning_gym.create_dataset(task, size=cfg.task_size, seed=seed, **dict(cfg.task_args))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"dataset.path={cfg.path!r} with dataset.task_args={dict(cfg.task_args)}: {exc}") from None
    return datasets.Dataset.from_list([{"question": p["question"], "answer": f"#### {p['answer']}"} for p in problems])


def load_raw_split(cfg: DatasetConfig, split: str) -> datasets.Dataset:
    """Read one split from local files, the hub, or the shipped offline copy.

    A local `cfg.path` is read directly: a file, or the files of a directory whose names
    start with `split` (e.g. `train.jsonl`, `train-00000.parquet`). A hub id goes to
    `datasets.load_dataset` when the hub is reachable (`engines/hub.py`); otherwise to the
    copy in `PACKAGED_DATASETS` (one warning per process).

    Raises:
        FileNotFoundError: a local directory without files for `split`.
        HubUnreachableError: a hub id, the hub unreachable, and no shipped copy of it.
        HubError: a hub id that the reachable hub has no dataset for (or refuses).
    """
    if cfg.path.startswith(PROCEDURAL_PREFIX):
        return procedural_split(cfg, split)
    path = Path(cfg.path).expanduser()
    if path.exists():
        return _load_local(path, split, cfg.path)
    if hub_reachable():
        try:
            return datasets.load_dataset(cfg.path, cfg.name, split=split)
        except DatasetNotFoundError as exc:  # no such dataset, or gated/private
            raise refused_error("dataset.path", cfg.path, "<local dir of jsonl/parquet>", exc) from None
    packaged = PACKAGED_DATASETS.get(cfg.path)
    if packaged is None or cfg.name not in (None, "main"):
        raise unreachable_error("dataset.path", cfg.path, "<local dir of jsonl/parquet>")
    if cfg.path not in _warned_packaged:
        _warned_packaged.add(cfg.path)
        logger.warning("hub unreachable for %s; using the copy shipped with areal (%s)", cfg.path, packaged)
    return _load_local(packaged, split, cfg.path)


def _load_local(path: Path, split: str, name: str) -> datasets.Dataset:
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.name.startswith(split)
    )
    if not files:
        raise FileNotFoundError(f"dataset.path={name!r} has no {split}*.jsonl or {split}*.parquet files")
    builder = DATA_SUFFIXES[files[0].suffix]
    return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")


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
