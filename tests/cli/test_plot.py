"""`areal plot`: the runs' curves in one PNG, each panel from stats.jsonl."""

import json
import subprocess

import matplotlib.image

from tests.conftest import REPO, areal_cli, cli_env
from workflows.metrics.plots import PANELS, curve, run_label


def write_run(run_dir, records):
    run_dir.mkdir(parents=True)
    (run_dir / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def records(n, slope):
    out = []
    for step in range(1, n + 1):
        r = {"step": step, "reward_mean": slope * step, "accuracy": slope * step / 2, "loss": 1.0 / step,
             "response_length_mean": 100 + step, "staleness_max": step % 3, "step_time_s": 2.0}
        if step % 2 == 0:
            r["eval_accuracy"] = slope * step
        out.append(r)
    return out


def test_curve_skips_steps_without_the_value():
    rs = records(5, 0.1)
    rs[2]["loss"] = None  # a NaN is written as null
    assert curve(rs, "eval_accuracy") == ([2, 4], [0.2, 0.4])
    assert curve(rs, "loss")[0] == [1, 2, 4, 5]
    assert curve(rs, "not_logged") == ([], [])
    assert {key for key, _ in PANELS} >= {"reward_mean", "accuracy", "eval_accuracy", "loss", "response_length_mean",
                                          "staleness_max", "step_time_s"}


def test_labels_tell_runs_apart(tmp_path):
    a, b = tmp_path / "x" / "trial0", tmp_path / "y" / "trial0"
    assert run_label(a, [a, b]) == "x/trial0" and run_label(b, [a, b]) == "y/trial0"
    assert run_label(a, [a]) == "trial0"


def test_plot_command_writes_a_png_of_several_runs(tmp_path):
    write_run(tmp_path / "a", records(12, 0.05))
    write_run(tmp_path / "b", records(8, 0.02))
    out = tmp_path / "curves.png"
    result = subprocess.run(areal_cli("plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)),
                            capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 1000  # 2 rows x 4 panels
    assert image.std() > 0.05  # drawn on, not blank

    missing = subprocess.run(areal_cli("plot", str(tmp_path / "nope")), capture_output=True, text=True, cwd=REPO,
                             env=cli_env(), timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "has no stats.jsonl" in missing.stderr
