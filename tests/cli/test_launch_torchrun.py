"""`areal launch --backend torchrun`: two "nodes" on this machine (two launch processes,
c10d rendezvous on 127.0.0.1) train like one process; SIGKILL of node 1 makes node 0 exit
with one line naming the lost rank and nothing left running; the next launch resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import psutil
import pytest
from typer.testing import CliRunner

from areal_cli.main import app
from launchers.local import find_free_port
from tests.cli.test_launch_faults import Launch
from tests.cli.test_train_async import SIGNAL
from tests.conftest import REPO, areal_cli, cli_env
from workflows.metrics.stats import read_stats

# Long enough that a rank holding the GIL for seconds (loading a model) is not declared
# lost on a busy 2-core machine; short enough to keep the test quick.
HEARTBEAT_S = 15.0


def node_command(tmp_path, port: int, node: int, run_id: str, *words: str) -> list[str]:
    return areal_cli("launch", "--backend", "torchrun", "--nnodes", "2", "--node-rank", str(node),
                     "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout", "120", "--grace-period", "3",
                     "--run-root", str(tmp_path / "launches"), "--run-id", f"{run_id}-node{node}", *words)


def two_nodes(tmp_path, run_id: str, *words: str) -> list[Launch]:
    port = find_free_port()
    return [Launch(node_command(tmp_path, port, node, run_id, *words)) for node in (0, 1)]


def test_dry_run_shows_the_torchrun_command_of_this_node(tmp_path):
    result = CliRunner().invoke(app, [
        "launch", "--backend", "torchrun", "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", "1",
        "--rdzv-endpoint", "node0.example:29400", "--max-restarts", "3", "--dry-run", "--run-root", str(tmp_path),
        "config=smoke", "dataset.batch_size=4"])
    assert result.exit_code == 0, result.output
    (node,) = json.loads(result.stdout)["submission"]
    argv = node["argv"]
    assert argv[1:3] == ["-m", "torch.distributed.run"] and node["rank"] == 1
    options = argv[3:argv.index("--no-python")]
    assert dict(zip(options[::2], options[1::2])) == {
        "--nnodes": "2", "--nproc-per-node": "2", "--node-rank": "1", "--rdzv-backend": "c10d",
        "--rdzv-endpoint": "node0.example:29400", "--rdzv-id": "areal", "--rdzv-conf": "join_timeout=600,is_host=false",
        "--max-restarts": "3", "--monitor-interval": "0.5"}
    assert argv[argv.index("--no-python") + 1:][-3:] == ["train", "config=smoke", "dataset.batch_size=4"]
    assert node["log_path"].endswith("node1.log") and not any(tmp_path.iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--nnodes", "2"], "needs --rdzv-endpoint"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:1"], "node rank 2 is not in 0..1"),
    (["--nnodes", "2", "--rdzv-endpoint", "nohostport"], "is not HOST:PORT"),
    (["--nnodes", "2", "--replicas", "3", "--rdzv-endpoint", "127.0.0.1:1"], "--replicas 3 != --nnodes 2"),
])
def test_bad_node_flags_exit_2(tmp_path, flags, message):
    result = CliRunner().invoke(app, ["launch", "--backend", "torchrun", *flags, "--dry-run", "--run-root",
                                      str(tmp_path), "config=smoke"])
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.slow
def test_two_torchrun_nodes_match_one_process(tmp_path, gsm8k_dir):
    common = ["config=smoke", f"dataset.path={gsm8k_dir}", "actor.deterministic=true", "trainer.total_steps=3", *SIGNAL]
    single = subprocess.run(areal_cli("train", f"run_dir={tmp_path / 'single'}", *common), capture_output=True,
                            text=True, cwd=REPO, env=cli_env(), timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    nodes = two_nodes(tmp_path, "dp", f"run_dir={tmp_path / 'dp'}", *common)
    for node in nodes:
        code, stderr = node.finish()
        assert code == 0 and "all 2 replica(s) succeeded" in stderr, stderr[-3000:]
    one, dp = read_stats(tmp_path / "single" / "stats.jsonl"), read_stats(tmp_path / "dp" / "stats.jsonl")
    assert len(one) == len(dp) == 3
    for a, b in zip(one, dp):
        assert a["num_sequences"] == b["num_sequences"] == 4
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert dp[-1]["kl"] > 0  # the policy moved, so the later losses carry real numerics


@pytest.mark.slow
def test_sigkill_of_node_1_is_named_by_node_0_and_the_next_launch_resumes(tmp_path, gsm8k_dir):
    steps = 6
    words = ["config=smoke", f"dataset.path={gsm8k_dir}", f"trainer.total_steps={steps}",
             "trainer.recover_freq_steps=1", f"trainer.heartbeat_timeout_s={HEARTBEAT_S}", f"run_dir={tmp_path / 'run'}"]
    nodes = two_nodes(tmp_path, "kill", *words)
    stats = tmp_path / "run" / "stats.jsonl"
    nodes[0].wait_until(lambda: stats.exists() and len(stats.read_text().splitlines()) >= 2, "second step")
    # torch elastic's c10d rendezvous hands out node ranks (GROUP_RANK) in its own order:
    # node 1 is the one whose worker got them, whichever --node-rank it was started with.
    group_rank = {}
    for index, node in enumerate(nodes):
        for p in node.descendants():
            if "areal_cli.main train" in node.seen.get(p.pid, ""):
                group_rank[index] = p.environ()["GROUP_RANK"]
    assert sorted(group_rank.values()) == ["0", "1"]
    node0, node1 = sorted(nodes, key=lambda n: group_rank[nodes.index(n)])
    victims = [psutil.Process(node1.proc.pid), *node1.descendants()]  # the whole machine of node 1
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code, stderr = node0.finish(timeout=120)
    took = time.monotonic() - killed
    assert code == 1, stderr[-3000:]
    lost = [line for line in stderr.splitlines() if "lost rank" in line]
    # Named by node 0's heartbeat watcher, or (when node 1 hosted the rendezvous and node
    # 0's agent died with it) by node 0's launcher from the ranks that joined there.
    assert len(lost) == 1 and lost[0].startswith("node ") and " failed areal: lost rank 1 (node " in lost[0], \
        stderr[-3000:]
    # Detected within the heartbeat timeout, plus torch elastic stopping its workers.
    assert took < HEARTBEAT_S + 30, took
    assert node0.orphans() == [] and node1.orphans() == []
    node1.finish()

    resumed = two_nodes(tmp_path, "resume", *words)
    for node in resumed:
        code, stderr = node.finish()
        assert code == 0, stderr[-3000:]
        assert node.orphans() == []
    assert "resuming from step" in "".join(p.read_text() for p in (tmp_path / "launches").glob("resume-node*/node*.log"))
    assert [r["step"] for r in read_stats(stats)] == list(range(1, steps + 1))  # each step once, none missing
