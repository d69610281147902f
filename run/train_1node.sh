#!/usr/bin/env bash
# Train on one machine: one process per visible accelerator (one process on MPS/CPU).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: run/train_1node.sh [TRAIN ARGS...]

Starts `torchrun --standalone` with NPROC processes running `python -m dinobridge.train TRAIN ARGS...`.

environment:
  NPROC      processes on this node (default: auto = visible cuda/npu/xpu devices, 1 on MPS/CPU;
             torchrun's own "auto" would start one process per CPU core on a CPU-only machine)
  LOG_RANK   show the console output of these local ranks only (e.g. 0 or 0,1; default: all)
  PYTHON     python interpreter (default: python)

example:
  NPROC=8 run/train_1node.sh --config-file configs/my.yaml --output-dir runs/exp1
  python -m dinobridge.train --help    # the training options
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi

PYTHON="${PYTHON:-python}"
NPROC="${NPROC:-auto}"
if [[ "$NPROC" == "auto" ]]; then
  NPROC="$("$PYTHON" -m dinobridge.distributed.device --nproc)"
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "run/train_1node.sh: NPROC must be a positive integer or 'auto', got '$NPROC'" >&2
  exit 2
fi

log_args=()
if [[ -n "${LOG_RANK:-}" ]]; then
  log_args=(--local-ranks-filter "$LOG_RANK" --role rank --tee 3)
fi

exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
  ${log_args[@]+"${log_args[@]}"} -m dinobridge.train "$@"
