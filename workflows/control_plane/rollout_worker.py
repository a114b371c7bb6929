"""A disaggregated rollout worker: the rollout controller in a process of its own.

    python -m workflows.control_plane.rollout_worker <run_dir>/config.yaml     # started by the trainer

With `deployment_mode=disaggregated rollout.workers=N` the trainer starts N of these
(workflows/control_plane/rollouts.py, through the launchers' executor) with `AREAL_ROLLOUT_WORKER=i/N`.
Worker i generates shard i of every global batch (rows `i::N`, as a data-parallel rank
would) with the same `WorkflowExecutor`, workflow and inference backend a colocated run
uses, and for each finished prompt group writes a safetensors file and commits its ref
to the run's SQLite store, one transaction per batch. Between rollouts it loads the
newest weights the trainer has published (`<run_dir>/weights/published/v<version>`).

The staleness bound holds across processes: the worker's `StalenessManager` counts the
batches it has delivered against the version it has loaded (never ahead of the
trainer's), so it runs at most `max_head_offpolicyness` versions ahead, and the trainer
expires on lease anything that has become staler; those expiries free the worker's
room as they do in a colocated run.

Restart: a worker skips every prompt already in the store, recounts what it delivered,
and tags its commits with the trainer's incarnation, so that a worker left over from a
trainer that crashed cannot commit samples of weights the restarted trainer undid. It
exits when the trainer that started it is gone.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

from engines.distributed import DistributedContext
from engines.model import load_model
from engines.weights import latest_version, load_published
from workflows.build import build_executor, build_inference, build_scorer, build_workflow, prepare_process
from workflows.config import ExperimentConfig, from_yaml
from workflows.control_plane.metadata import StaleWriterError, sample_id_of
from workflows.control_plane.modes import sample_ref, samples_dir, store_path
from workflows.control_plane.rollouts import TRAINER_PID_ENV, WORKER_ENV, weights_root
from workflows.control_plane.samples import write_sample
from workflows.control_plane.sqlite_store import SQLiteMetadataStore
from workflows.data.dataset import PromptLoader, load_prompt_dataset

logger = logging.getLogger("areal.rollout_worker")

POLL_SECONDS = 0.05  # between looks for new weights while the staleness bound holds the worker


class Uncommitted:
    """The loader's batches without the prompts already in the store (re-iterable, one
    epoch per `iter`, as the executor expects); an epoch with nothing left is skipped."""

    def __init__(self, loader: PromptLoader, committed: set[str]) -> None:
        self.loader, self.committed = loader, committed

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            yielded = False
            for batch in self.loader:
                rows = [row for row in batch if sample_id_of(row["epoch"], row["id"]) not in self.committed]
                if rows:
                    yielded = True
                    yield rows
            if yielded:
                return


def _worker_identity() -> tuple[int, int]:
    raw = os.environ.get(WORKER_ENV, "")
    index, _, count = raw.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise SystemExit(f"{WORKER_ENV}={raw!r} must be '<index>/<count>' (the trainer sets it)")
    return int(index), int(count)


def _load_weights(inference, version: int, path: Path) -> None:
    if hasattr(inference, "update_weights_from_disk"):  # inference servers read the directory
        inference.update_weights_from_disk(path, version)
    else:
        inference.update_weights(load_published(path))
    inference.set_version(version)


def run_worker(cfg: ExperimentConfig, index: int, count: int, trainer_pid: Optional[int] = None) -> int:
    """Generate shard `index` of `count` until the trainer is gone; returns the exit status.

    Raises:
        RolloutFailureError: rollouts kept failing (the trainer restarts the worker, up to
            `rollout.worker_restarts` times).
    """
    run_dir = cfg.resolved_run_dir()
    model_dir, tokenizer = prepare_process(cfg)
    loader = PromptLoader(load_prompt_dataset(cfg.dataset, tokenizer), batch_size=cfg.dataset.batch_size,
                          shuffle=cfg.dataset.shuffle, seed=cfg.seed, rank=index, world_size=count)
    store = SQLiteMetadataStore(store_path(run_dir))
    incarnation = store.current_incarnation()
    published = weights_root(run_dir)
    found = latest_version(published)
    if found is None:
        raise SystemExit(f"no published weights in {published}; the trainer publishes them before starting workers")

    policy = load_model(cfg.model, model_dir, seed=cfg.seed)
    # A worker never trains: weights reach its sampler only through `update_weights`,
    # between rollouts.
    inference, servers = build_inference(cfg, policy, tokenizer, model_dir, run_dir, DistributedContext(rank=index),
                                         trains_policy=False)
    scorer = build_scorer(cfg)
    workflow = build_workflow(cfg, tokenizer, scorer)
    executor = build_executor(cfg, inference, consumer_batch_size=loader.local_batch_size)
    try:
        _load_weights(inference, *found)
        delivered = store.refs()  # by every worker, before this one started
        mine = [r for r in delivered if r.worker == index]
        expired_seen = store.count("expired", worker=index)
        executor.initialize()
        executor.staleness_manager.on_accepted_recovered(len(mine) - expired_seen)
        source = Uncommitted(loader, {r.sample_id for r in delivered})
        logger.info("rollout worker %d/%d: version %d, %d samples delivered before", index, count, found[0], len(mine))
        while trainer_pid is None or os.getppid() == trainer_pid:
            found = latest_version(published)
            if found is not None and found[0] > inference.get_version():
                executor.pause()
                inference.pause()
                try:
                    _load_weights(inference, *found)
                except FileNotFoundError:
                    pass  # replaced by a newer version meanwhile: the next pass loads that
                finally:
                    inference.resume()
                    executor.resume()
            expired = store.count("expired", worker=index)
            for _ in range(expired - expired_seen):
                executor.staleness_manager.on_rollout_expired()  # the trainer dropped it: room again
            expired_seen = expired
            # Start a batch only when the staleness bound lets it complete; otherwise wait
            # for the trainer's next version.
            room = max(executor.staleness_manager.get_staleness_room(), 0)
            if executor.num_ready + executor.get_stats().running + room < executor.consumer_batch_size:
                time.sleep(POLL_SECONDS)
                continue
            try:
                trajectories = executor.prepare_trajectories(source, workflow, timeout=0.5)
            except TimeoutError:
                continue
            refs = []
            for trajectory in trajectories:
                ref = sample_ref(trajectory, worker=index)
                refs.append(replace(ref, path=str(write_sample(samples_dir(run_dir), ref.sample_id, trajectory))))
            try:
                store.commit(refs, incarnation=incarnation)
            except StaleWriterError:
                logger.info("rollout worker %d: a newer trainer took over; exiting", index)
                return 0
        logger.info("rollout worker %d: the trainer (pid %s) is gone; exiting", index, trainer_pid)
        return 0
    finally:
        try:
            executor.destroy()
        finally:
            try:
                scorer.close()
            finally:
                inference.destroy()
                if servers is not None:
                    servers.stop()
                store.close()


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m workflows.control_plane.rollout_worker <run_dir>/config.yaml")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    index, count = _worker_identity()
    pid = os.environ.get(TRAINER_PID_ENV)
    return run_worker(from_yaml(Path(argv[0])), index, count, int(pid) if pid and pid.isdigit() else None)


if __name__ == "__main__":
    sys.exit(main())
