#!/usr/bin/env bash
# Train on several machines: run this script once on every node with the same MASTER_ADDR/MASTER_PORT.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: NNODES=N NODE_RANK=i MASTER_ADDR=host [MASTER_PORT=29500] run/train_multinode.sh [TRAIN ARGS...]

Run the same command on every node (node ranks 0..N-1). Node 0's address serves the c10d rendezvous:
  torchrun --nnodes=$NNODES --node_rank=$NODE_RANK --nproc_per_node=$NPROC
           --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv_id=$RUN_ID
           -m dinobridge.train TRAIN ARGS...

environment:
  NNODES       number of nodes (required)
  NODE_RANK    rank of this node, 0..NNODES-1 (required; with c10d the global ranks follow the rendezvous order)
  MASTER_ADDR  address of node 0, reachable from every node (required)
  MASTER_PORT  free TCP port on node 0 (default 29500)
  NPROC        processes per node (default: auto = visible cuda/npu/xpu devices, 1 on MPS/CPU)
  RUN_ID       rendezvous id shared by all nodes of one job (default: dinobridge)
  LOG_RANK     show the console output of these local ranks only (default: all)
  PYTHON       python interpreter (default: python)
Pass the same --output-dir on every node (a shared filesystem); rank 0 writes it.

example (2 nodes x 8 NPUs; on the second node NODE_RANK=1):
  source run/npu_env.sh
  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=40028 NPROC=8 \
    run/train_multinode.sh --config-file configs/my.yaml --output-dir /shared/runs/exp1
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi

missing=()
for var in NNODES NODE_RANK MASTER_ADDR; do
  if [[ -z "${!var:-}" ]]; then
    missing+=("$var")
  fi
done
if (( ${#missing[@]} > 0 )); then
  echo "run/train_multinode.sh: missing environment variable(s): ${missing[*]} (run with -h for usage)" >&2
  exit 2
fi
if ! [[ "$NNODES" =~ ^[1-9][0-9]*$ && "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
  echo "run/train_multinode.sh: expected NNODES >= 1 and 0 <= NODE_RANK < NNODES," \
    "got NNODES='$NNODES' NODE_RANK='$NODE_RANK'" >&2
  exit 2
fi

PYTHON="${PYTHON:-python}"
MASTER_PORT="${MASTER_PORT:-29500}"
RUN_ID="${RUN_ID:-dinobridge}"
NPROC="${NPROC:-auto}"
if [[ "$NPROC" == "auto" ]]; then
  NPROC="$("$PYTHON" -m dinobridge.distributed.device --nproc)"
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "run/train_multinode.sh: NPROC must be a positive integer or 'auto', got '$NPROC'" >&2
  exit 2
fi

log_args=()
if [[ -n "${LOG_RANK:-}" ]]; then
  log_args=(--local-ranks-filter "$LOG_RANK" --role rank --tee 3)
fi

exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RUN_ID" \
  ${log_args[@]+"${log_args[@]}"} -m dinobridge.train "$@"
