#!/usr/bin/env bash
# Debug run: 1 node, 1 process, your config and an output directory (the layout of dino_bridge's
# run/run_ssl_debug.sh). On an Ascend machine the NPU environment (run/npu_env.sh) is loaded first.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: run/run_ssl_debug.sh CONFIG_FILE OUTPUT_DIR [OVERRIDES...]

Runs one training process under torchrun on this machine:
  torchrun --nnodes=1 --nproc_per_node=1 --node_rank=0 --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT
           -m dinobridge.train --config-file CONFIG_FILE --output-dir OUTPUT_DIR OVERRIDES...
OVERRIDES are config overrides passed through (e.g. train.batch_size_per_gpu=8 optim.epochs=1).

environment:
  MASTER_ADDR / MASTER_PORT  default 127.0.0.1 / 40028
  ASCEND_TOOLKIT_HOME        if its set_env.sh exists, run/npu_env.sh is sourced (NPU 0 unless
                             ASCEND_RT_VISIBLE_DEVICES says otherwise)
  PYTHON                     python interpreter (default: python)

example:
  run/run_ssl_debug.sh configs/dinov3_vitlarge_pretrain.yaml runs/debug train.batch_size_per_gpu=4
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi
if (( $# < 2 )); then
  echo "run/run_ssl_debug.sh: expected CONFIG_FILE and OUTPUT_DIR (run with -h for usage)" >&2
  exit 2
fi
config_file="$1"
output_dir="$2"
shift 2
if [[ ! -f "$config_file" ]]; then
  echo "run/run_ssl_debug.sh: config file not found: $config_file" >&2
  exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -f "${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit}/set_env.sh" ]]; then
  set +u
  # shellcheck source=run/npu_env.sh
  source "$here/npu_env.sh"
  set -u
fi

PYTHON="${PYTHON:-python}"
exec "$PYTHON" -m torch.distributed.run \
  --nnodes=1 \
  --nproc_per_node=1 \
  --node_rank=0 \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${MASTER_PORT:-40028}" \
  -m dinobridge.train \
  --config-file "$config_file" \
  --output-dir "$output_dir" \
  "$@"
