"""A hub id that cannot be used: one `config error:` line, exit 2, in seconds, no traceback.

Two ways a hub id fails: the hub is unreachable and no offline copy is known, or the hub
answers but has no such repository. The second runs against a local fake hub that
answers its root and 404 `RepoNotFound` to everything else.
"""

import http.server
import subprocess
import threading
import time

import pytest

from tests.conftest import areal_cli, cli_env

MODEL_ID, DATA_ID = "nobody-here/no-such-model", "nobody-here/no-such-data"
# (override, the start of the one line, its end: the fix)
CASES = [
    (f"model.path={MODEL_ID}", f"config error: model.path='{MODEL_ID}': ", "model.path=<local model dir>"),
    (f"dataset.path={DATA_ID}", f"config error: dataset.path='{DATA_ID}': ", "dataset.path=<local dir or file of jsonl/json/parquet/csv>"),
]


def run_cases(tmp_path, env: dict) -> list[tuple[int, str]]:
    started = time.monotonic()
    # From an empty directory: nothing may depend on the current directory.
    procs = [
        subprocess.Popen(
            areal_cli("train", "config=smoke", f"run_dir={tmp_path / str(i)}", override),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
        )
        for i, (override, _, _) in enumerate(CASES)
    ]
    try:
        # Started together on a 2-core machine, so the budget is shared: 15 s each.
        outputs = [p.communicate(timeout=15 * len(procs)) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.monotonic() - started < 15 * len(procs)
    results = []
    for (override, start, fix), proc, (out, err) in zip(CASES, procs, outputs):
        assert proc.returncode == 2, (override, out[-500:], err[-2000:])
        assert "Traceback" not in out + err, err
        (line,) = [line for line in err.splitlines() if line.startswith("config error:")]
        assert line.startswith(start) and line.endswith(fix), line
        results.append(line)
    return results


def test_unreachable_hub_ids_exit_2_with_one_line(tmp_path):
    lines = run_cases(tmp_path, {**cli_env(), "HF_HUB_OFFLINE": "1"})
    for line in lines:
        assert "the Hugging Face hub is unreachable (HF_HUB_OFFLINE=1) and no offline copy is known" in line


class NoRepoHub(http.server.BaseHTTPRequestHandler):
    """The hub's root answers; every repository is `RepoNotFound`, as the real hub says."""

    def _answer(self, with_body: bool) -> None:
        body = b"" if self.path == "/" else b'{"error": "Repository not found"}'
        self.send_response(200 if self.path == "/" else 404)
        if body:
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_HEAD(self):
        self._answer(False)

    def do_GET(self):
        self._answer(True)

    def log_message(self, *args):
        pass


@pytest.fixture
def no_repo_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoRepoHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_hub_ids_the_hub_does_not_serve_exit_2_with_one_line(tmp_path, no_repo_hub, model_dir):
    # model_dir: SmolLM2 converted once, so the dataset case (smoke's model is SmolLM2,
    # which this hub does not serve either) falls back to the packaged copy at once.
    env = {k: v for k, v in cli_env().items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=no_repo_hub, HF_HOME=str(tmp_path / "hf"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    for line in run_cases(tmp_path, env):
        assert "the Hugging Face hub has no such repository or refuses access" in line
