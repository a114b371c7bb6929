#!/usr/bin/env bash
# What only a GPU can show, in one command (budget: under 8 minutes on one GPU):
#
#   1. cuda     the CUDA test: train and generate with the policy on cuda:0
#               (tests/engines/test_device.py::test_train_and_generate_on_cuda)
#   2. fsdp2    FSDP2 on one GPU in bf16 (NCCL, a one-rank group): the test
#               tests/engines/test_fsdp.py::test_fsdp2_in_bf16_on_one_gpu, then 2 steps of
#               `areal train config=smoke` with actor.parallelism=fsdp2,
#               actor.mixed_precision=bf16 and a recover checkpoint (DCP) and export
#   3. lora     LoRA on the GPU: a slot for `actor.lora` (LORA_CHECK below); skipped
#               with a note until that setting exists
#   4. vllm     the vLLM GPU server path: GRPO with rollouts from a real CUDA vLLM server
#               (tests/engines/test_vllm_server.py, synchronous case); needs the CUDA
#               build in .venv-vllm/ (`make install-vllm VLLM_PACKAGE=vllm VLLM_TORCH=`,
#               done beforehand: it downloads several GB and is not part of the budget)
#
#   bash benchmarks/gpu_check.sh                 # all four
#   bash benchmarks/gpu_check.sh cuda fsdp2      # some
#
# Each check runs under its own time limit (90 + 150 + 60 + 180 s: 8 minutes at most) and prints PASS, FAIL or SKIP; the script
# exits 1 when any check failed (a SKIP is not a failure, and says why). Logs go to
# $GPU_CHECK_LOGS (default: a fresh temporary directory). Nothing leaves 127.0.0.1, and
# HF_HUB_OFFLINE=1: the model is the packaged SmolLM2 (make install).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PY:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python)"
LOGS="${GPU_CHECK_LOGS:-$(mktemp -d -t areal-gpu-check-XXXX)}"
mkdir -p "$LOGS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# The LoRA branch sets this to the command that checks `actor.lora` on the GPU (e.g. a
# pytest node id run through "$PY -m pytest"); empty: the check is skipped.
LORA_CHECK="${LORA_CHECK:-}"
CHECKS=("$@")
[ ${#CHECKS[@]} -eq 0 ] && CHECKS=(cuda fsdp2 lora vllm)
FAILED=0
START=$(date +%s)

report() {  # name status seconds note
    printf '%-6s %-4s %4ss  %s\n' "$1" "$2" "$3" "$4"
    [ "$2" = FAIL ] && FAILED=1
    return 0
}

run_check() {  # name limit_s function-or-command
    local name="$1" limit="$2" command="$3"
    local t0=$(date +%s)
    # timeout runs programs, not shell functions: the check runs in a child bash that
    # inherits them (export -f below).
    if timeout --kill-after=10 "$limit" bash -c "$command" >"$LOGS/$name.log" 2>&1; then
        report "$name" PASS $(( $(date +%s) - t0 )) "$LOGS/$name.log"
    else
        local rc=$?
        local why="exit $rc"
        [ $rc -eq 124 ] && why="over ${limit}s"
        report "$name" FAIL $(( $(date +%s) - t0 )) "$why; tail of $LOGS/$name.log:"
        tail -n 20 "$LOGS/$name.log" | sed 's/^/    /'
    fi
}

fsdp2_check() {
    "$PY" -m pytest -q -p no:cacheprovider -m slow -rs \
        "tests/engines/test_fsdp.py::test_fsdp2_in_bf16_on_one_gpu" | tee "$LOGS/fsdp2-pytest.log" || return 1
    grep -q "1 passed" "$LOGS/fsdp2-pytest.log" || return 1
    local run_dir="$LOGS/fsdp2-run"
    "$PY" -m areal_cli.main train config=smoke "dataset.path=$REPO/workflows/data/gsm8k" "run_dir=$run_dir" \
        model.device=cuda actor.parallelism=fsdp2 actor.mixed_precision=bf16 trainer.total_steps=2 \
        trainer.recover_freq_steps=1 || return 1
    test -f "$run_dir/checkpoints/recover/dcp/.metadata" || { echo "no DCP recover checkpoint"; return 1; }
    "$PY" -c "import sys; from transformers import AutoModelForCausalLM as M; M.from_pretrained(sys.argv[1])" \
        "$run_dir/checkpoints/final"
}

cuda_check() {
    "$PY" -m pytest -q -p no:cacheprovider -rs \
        "tests/engines/test_device.py::test_train_and_generate_on_cuda" | tee "$LOGS/cuda-pytest.log" || return 1
    grep -q "1 passed" "$LOGS/cuda-pytest.log"
}

vllm_check() {
    "$PY" -m pytest -q -p no:cacheprovider -m slow -rs \
        "tests/engines/test_vllm_server.py::test_grpo_on_a_vllm_server[synchronous]" | tee "$LOGS/vllm-pytest.log" \
        || return 1
    grep -q "1 passed" "$LOGS/vllm-pytest.log"
}

export PY LOGS REPO
export -f cuda_check fsdp2_check vllm_check

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1)): nothing to check"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
echo "logs: $LOGS"

for check in "${CHECKS[@]}"; do
    case "$check" in
        cuda) run_check cuda 90 cuda_check ;;
        fsdp2) run_check fsdp2 150 fsdp2_check ;;
        lora)
            if [ -z "$LORA_CHECK" ]; then
                report lora SKIP 0 "no LORA_CHECK yet: actor.lora is not in this branch"
            else
                run_check lora 60 "$LORA_CHECK"
            fi ;;
        vllm)
            if [ ! -x "$REPO/.venv-vllm/bin/python" ]; then
                report vllm FAIL 0 "no .venv-vllm/: run make install-vllm VLLM_PACKAGE=vllm VLLM_TORCH= first"
            else
                run_check vllm 180 vllm_check
            fi ;;
        *) echo "unknown check $check (cuda, fsdp2, lora, vllm)"; exit 2 ;;
    esac
done
echo "total $(( $(date +%s) - START ))s"
exit $FAILED
