"""A hub id that cannot be reached and has no offline copy: one line, exit 2, in seconds."""

import subprocess
import time

from tests.conftest import areal_cli, cli_env

# (override, the key the one line must name, the fix it must give)
UNREACHABLE = [
    ("model.path=nobody-here/no-such-model", "model.path='nobody-here/no-such-model'", "pass model.path=<local model dir>"),
    ("dataset.path=nobody-here/no-such-data", "dataset.path='nobody-here/no-such-data'",
     "pass dataset.path=<local dir of jsonl/parquet>"),
]


def test_unreachable_hub_ids_exit_2_with_one_line(tmp_path):
    env = {**cli_env(), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    # From an empty directory: nothing may depend on the current directory.
    procs = [
        subprocess.Popen(
            areal_cli("train", "config=smoke", f"run_dir={tmp_path / str(i)}", override),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
        )
        for i, (override, _, _) in enumerate(UNREACHABLE)
    ]
    try:
        # Started together on a 2-core machine, so the budget is shared: 15 s each.
        outputs = [p.communicate(timeout=15 * len(procs)) for p in procs]
    finally:
        for p in procs:
            p.kill()
    elapsed = time.monotonic() - started
    for (override, key, fix), proc, (out, err) in zip(UNREACHABLE, procs, outputs):
        assert proc.returncode == 2, (override, out[-500:], err[-2000:])
        errors = [line for line in err.splitlines() if line.startswith("config error:")]
        assert errors == [
            f"config error: {key}: the Hugging Face hub is unreachable (HF_HUB_OFFLINE=1) and no offline copy is "
            f"known; {fix}"
        ], err
        # Besides it, at most the model's own fallback warning (the dataset case loads SmolLM2 first).
        others = [line for line in err.splitlines() if line.strip() and not line.startswith("config error:")]
        assert all(line.startswith("WARNING engines.model: hub unreachable") for line in others), err
        assert "Traceback" not in out + err
    assert elapsed < 15 * len(procs)
