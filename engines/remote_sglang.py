"""A client of SGLang's native HTTP API (`python -m sglang.launch_server --skip-tokenizer-init`).

Generation is `POST /generate` with the prompt as `input_ids`, `sampling_params` and
`return_logprob: true`. The answer is `output_ids` and `meta_info`, in which
`output_token_logprobs` holds one `[logprob, token_id, text]` per generated token (text is
null without a tokenizer) and `finish_reason` is `{"type": "stop" | "length" | "abort", ...}`
(`matched` names the stop token). SGLang's logprobs are those of softmax(logits /
temperature) before top-p / top-k filtering, the quantity the trainer computes, unless the
server runs with `SGLANG_RETURN_ORIGINAL_LOGPROB=1` (then they ignore the temperature).
`min_p` and `repetition_penalty` are sent although they are SGLang's defaults: with
`--sampling-defaults model` (SGLang's default) the model's generation_config.json would fill
in every one of temperature, top_p, top_k, min_p and repetition_penalty that a request leaves
out. A seed is sent only when the request has one, as `sampling_params.sampling_seed`, which
SGLang honours only with `--enable-deterministic-inference`.

Weights are reloaded in place by `POST /update_weights_from_disk` with `model_path`; the
scheduler flushes its radix cache after a successful load when `flush_cache` is true (the
default, sent explicitly), so no separate `/flush_cache` is called: that endpoint (GET or
POST) answers plain text, which `post_json` rejects as not JSON. `weight_version` labels the
server's answers (`meta_info.weight_version`, `GET /get_weight_version`). A refused reload
answers HTTP 400 with `{"success": false, "message": ...}`, which `post_json` raises as
`ServerResponseError` carrying the message.

Interrupting is `POST /abort_request` with `{"abort_all": true}` (an empty 200): each request
in flight answers with the tokens it had and `finish_reason.type == "abort"`, and
`RemoteInferenceEngine` requests the rest after `resume`. SGLang's server-side alternative is
`POST /pause_generation` (`mode`: abort, retract or in_place) and `POST
/continue_generation`, which stop and restart the scheduler itself, keeping (retract,
in_place) the requests to finish on the new weights. This client pauses on its side instead
(no new request until `resume`, the same for vLLM) and aborts only when `interruptible`.

Sources, github.com/sgl-project/sglang: python/sglang/srt/managers/io_struct.py
(GenerateReqInput, UpdateWeightFromDiskReqInput, AbortReq) and tokenizer_manager.py
(`_handle_batch_output`, `_handle_abort_req`, `detokenize_logprob_tokens`) at 001067ff;
srt/sampling/sampling_params.py at 00c17caf; srt/entrypoints/http_server.py (routes) at
0025436e; srt/managers/schedule_batch.py (FINISH_* reasons) at 000eaffa;
srt/managers/scheduler_components/weight_updater.py (`flush_cache_after_weight_update`);
srt/layers/sampler.py (logprobs); docs/basic_usage/native_api.ipynb (recorded answers of
/update_weights_from_disk). SGLang versions that answered `token_ids` instead of
`output_ids` are not supported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engines.inference import GenerationRequest
from engines.remote import Completion, RemoteInferenceEngine, ServerResponseError

FINISH_TYPES = ("stop", "length", "abort")


class RemoteSGLangEngine(RemoteInferenceEngine):
    """`InferenceEngine` over SGLang servers; see `RemoteInferenceEngine` for the arguments."""

    backend = "sglang"

    def completion_request(self, request: GenerationRequest, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, dict]:
        sampling = {
            "max_new_tokens": max_new_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k if request.top_k > 0 else -1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
        }
        if request.stop_token_ids:
            sampling["stop_token_ids"] = list(request.stop_token_ids)
        if request.seed is not None:
            sampling["sampling_seed"] = request.seed
        return "/generate", {"input_ids": list(prompt_ids), "sampling_params": sampling, "return_logprob": True}

    def parse_completion(self, body: dict) -> Completion:
        meta = _field(body, "meta_info", dict)
        reason = _field(_field(meta, "finish_reason", dict, "meta_info."), "type", str, "meta_info.finish_reason.")
        if reason not in FINISH_TYPES:
            raise ServerResponseError(f"SGLang meta_info.finish_reason.type is {reason!r}, not one of {FINISH_TYPES}")
        ids = _field(body, "output_ids", list)
        # An abort before the first token may come without output_token_logprobs.
        if ids:
            entries = _field(meta, "output_token_logprobs", list, "meta_info.")
        else:
            entries = meta.get("output_token_logprobs") or []
        if len(entries) != len(ids):
            raise ServerResponseError(f"SGLang answered {len(ids)} output_ids with {len(entries)} output_token_logprobs")
        logprobs = [_logprob(entry, token, i) for i, (entry, token) in enumerate(zip(entries, ids))]
        return Completion(list(ids), logprobs, reason)

    def reload_requests(self, path: Path, version: int) -> list[tuple[str, dict]]:
        # SGLang's answer to a refused load is HTTP 400, which post_json raises.
        body = {"model_path": str(path), "flush_cache": True, "weight_version": str(version)}
        return [("/update_weights_from_disk", body)]

    def abort_request(self) -> tuple[str, dict]:
        return "/abort_request", {"abort_all": True}

    def check_reload_answer(self, route: str, answer: Any) -> None:
        # A router in front of SGLang may pass a refusal on with status 200.
        if isinstance(answer, dict) and answer.get("success") is False:
            raise ServerResponseError(f"POST {route} refused: {answer.get('message', answer)}")


def _field(obj: Any, key: str, kind: type, where: str = "") -> Any:
    """`obj[key]`, which must be a `kind`; else ServerResponseError naming the field."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind):
        found = "missing" if not isinstance(obj, dict) or key not in obj else f"a {type(value).__name__}"
        raise ServerResponseError(
            f"SGLang /generate answer: {where}{key} is {found}, expected a {kind.__name__}: {str(obj)[:300]}"
        )
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _logprob(entry: Any, token: Any, i: int) -> float:
    """The logprob in one `[logprob, token_id, text]` entry, checked against `output_ids[i]`."""
    if not _is_int(token):
        raise ServerResponseError(f"SGLang output_ids[{i}] is {token!r}, not a token id")
    if not (isinstance(entry, list) and len(entry) >= 2 and _is_int(entry[1])
            and isinstance(entry[0], (int, float)) and not isinstance(entry[0], bool)):
        raise ServerResponseError(
            f"SGLang meta_info.output_token_logprobs[{i}] is {entry!r}, not [logprob, token_id, text]"
        )
    if entry[1] != token:
        raise ServerResponseError(
            f"SGLang meta_info.output_token_logprobs[{i}] is for token {entry[1]} but output_ids[{i}] is {token}"
        )
    return float(entry[0])
