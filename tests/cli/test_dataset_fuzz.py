"""Generated bad datasets through the real CLI: `areal train` exits 0 (it trained) or 2
(one `config error:` line), never a traceback."""

import csv
import json
import subprocess
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, areal_cli, cli_env

COLUMNS = ["question", "answer", "prompt", "solution", "x"]
VALUES = st.one_of(
    st.text(max_size=12), st.integers(-5, 5), st.floats(allow_nan=True), st.none(), st.booleans(),
    st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.sampled_from("ab"), st.integers(0, 2), max_size=2),
    st.just("#### 4"), st.just("What is 2 + 2?"),
)
ROWS = st.lists(st.dictionaries(st.sampled_from(COLUMNS), VALUES, max_size=4), max_size=4)
DAMAGE = st.sampled_from(["none", "broken_json", "empty", "truncated", "not_an_object", "binary"])


def write(path: Path, rows: list[dict], damage: str) -> None:
    if damage == "empty":
        path.write_text("")
        return
    if damage == "binary":
        path.write_bytes(b"\x00\xff\xfe garbage \x89PNG")
        return
    if path.suffix == ".csv":
        names = sorted({k for row in rows for k in row}) or ["x"]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=names)
            writer.writeheader()
            writer.writerows([{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()}
                              for r in rows])
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = path.read_text()
    if damage == "broken_json":
        path.write_text(text + '{"question": "q", "answer": \n')
    elif damage == "truncated":
        path.write_text(text[: max(1, len(text) * 2 // 3)])
    elif damage == "not_an_object":
        path.write_text(text + "[1, 2]\n")


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rows=ROWS, damage=DAMAGE, suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_generated_bad_datasets_exit_0_or_2_never_a_traceback(rows, damage, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"train{suffix}"
        write(path, rows, damage)
        env = cli_env()
        env["HF_DATASETS_CACHE"] = str(Path(tmp) / "cache")  # no cache of each generated file left behind
        result = subprocess.run(
            areal_cli("train", "config=smoke", f"dataset.path={path}", f"run_dir={Path(tmp) / 'run'}",
                      "trainer.total_steps=1", "dataset.batch_size=1"),
            capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
        )
        assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
        assert result.returncode in (0, 2), result.stderr[-3000:]
        if result.returncode == 2:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("config error: dataset."), result.stderr[-3000:]
