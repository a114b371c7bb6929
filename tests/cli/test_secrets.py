"""Planted tokens never leak: not into a file a run writes, a log, the console, nor any
process's command line while the runs are going.

Fake HF_TOKEN, WANDB_API_KEY and MODAL_TOKEN_ID/_SECRET are in the environment of: a smoke
training with every tracker, a two-replica local launch of it, the Modal and HF Jobs dry
runs (the tokens passed on as `--secret`), and a run that fails. A thread reads
`/proc/*/cmdline` of every process on the machine every 10 ms meanwhile.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, areal_cli, cli_env

TOKENS = {
    "HF_TOKEN": "hf_PlantedTokenAbCdEfGhIjKlMnOpQrStUv",
    "WANDB_API_KEY": "0123456789abcdefPLANTEDwandbkey0123456789",
    "MODAL_TOKEN_ID": "ak-PlantedModalTokenId0123",
    "MODAL_TOKEN_SECRET": "as-PlantedModalTokenSecret4567",
}


class CmdlineScanner(threading.Thread):
    """Reads every process's command line until stopped; records tokens found there."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.found: list[str] = []
        self.scans = 0
        self.commands_seen: set[str] = set()

    def run(self) -> None:
        while not self.stop.is_set():
            for path in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    argv = path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue  # the process ended
                self.commands_seen.add(argv[:200])
                self.found += [f"{name} in {argv[:200]}" for name, token in TOKENS.items() if token in argv]
            self.scans += 1
            time.sleep(0.01)


def files_holding_tokens(root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{name} in {path}" for name, token in TOKENS.items() if token.encode() in data]
    return hits


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_planted_tokens_appear_in_no_file_log_or_command_line(tmp_path, gsm8k_dir):
    env = {**cli_env(), **TOKENS, "WANDB_MODE": "offline"}
    smoke = ["config=smoke", f"dataset.path={gsm8k_dir}", "trainer.total_steps=2"]
    runs = {
        "train": areal_cli("train", *smoke, f"run_dir={tmp_path / 'train'}",
                           "stats_logger.backends=[console,jsonl,tensorboard,wandb]"),
        "launch": areal_cli("launch", "--replicas", "2", "--run-root", str(tmp_path / "launch"), "--run-id", "two",
                            *smoke, f"run_dir={tmp_path / 'launch-run'}"),
        "modal": areal_cli("launch", "--backend", "modal", "--replicas", "2", "--secret", "HF_TOKEN",
                           "--secret", "WANDB_API_KEY", "--run-root", str(tmp_path / "modal"), "--dry-run", *smoke),
        "hf-jobs": areal_cli("launch", "--backend", "hf-jobs", "--replicas", "2", "--image", "ghcr.io/example/areal:1",
                             "--secret", "HF_TOKEN", "--secret", "WANDB_API_KEY", "--dry-run", *smoke),
        # Every rollout fails from version 0: the run stops with its error line.
        "failing": areal_cli("train", *smoke, f"run_dir={tmp_path / 'failing'}", "rollout.max_consecutive_rejections=2"),
    }
    scanner = CmdlineScanner()
    scanner.start()
    outputs, codes = {}, {}
    try:
        for name, argv in runs.items():
            run_env = {**env, "AREAL_FAULT_GENERATE_FROM_VERSION": "0"} if name == "failing" else env
            result = subprocess.run(argv, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=600)
            outputs[name], codes[name] = result.stdout + result.stderr, result.returncode
    finally:
        scanner.stop.set()
        scanner.join()
    assert codes == {"train": 0, "launch": 0, "modal": 0, "hf-jobs": 0, "failing": 1}, {
        k: v[-1500:] for k, v in outputs.items()}
    # The scan really watched the runs: it saw the replicas and the reward workers.
    assert scanner.scans > 100
    assert any("areal_cli.main train" in c for c in scanner.commands_seen)
    assert any("multiprocessing" in c for c in scanner.commands_seen)
    assert scanner.found == []
    assert [f"{name} in {run} output" for run, out in outputs.items() for name, t in TOKENS.items() if t in out] == []
    written = files_holding_tokens(tmp_path)
    assert written == []
    # The runs did write what a leak would hide in: configs, stats, logs, tracker files.
    names = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert {"config.yaml", "stats.jsonl", "rank0.log", "rank1.log"} <= names
    assert any(n.endswith(".wandb") for n in names) and any(n.startswith("events.out.tfevents") for n in names)
