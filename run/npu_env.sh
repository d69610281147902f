#!/usr/bin/env bash
# Ascend NPU environment for dinobridge. Source it in the shell that launches training:
#     source run/npu_env.sh
# or run it to print the resulting settings and the device dinobridge would pick:
#     bash run/npu_env.sh
# Every variable keeps a value you exported before; only unset ones get the defaults below.
# When sourced it does not change your shell options (CANN's set_env.sh is not `set -u` safe).

_dinobridge_npu_usage() {
  cat <<'USAGE'
usage: source run/npu_env.sh      (sets the Ascend environment in this shell)
       bash run/npu_env.sh [-h]   (prints the settings and the selected device)

environment (defaults in brackets):
  ASCEND_TOOLKIT_HOME        CANN toolkit; its set_env.sh is sourced if present [/usr/local/Ascend/ascend-toolkit]
  ASCEND_RT_VISIBLE_DEVICES  NPUs this job may use, like CUDA_VISIBLE_DEVICES [0]; for 8 cards: 0,1,2,3,4,5,6,7.
                             torch sees them as npu:0..N-1 and LOCAL_RANK indexes that list.
  MASTER_ADDR / MASTER_PORT  rendezvous address for torchrun [127.0.0.1 / 40028]
  HCCL_CONNECT_TIMEOUT       seconds to build HCCL links [1200]
  HCCL_EXEC_TIMEOUT          seconds a collective may wait [1836, the HCCL default]
  ASCEND_PROCESS_LOG_PATH    CANN log directory [CANN default, ~/ascend/log]
USAGE
}

_dinobridge_npu_env() {
  local toolkit="${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit}"
  if [[ -f "$toolkit/set_env.sh" ]]; then
    # shellcheck disable=SC1091
    source "$toolkit/set_env.sh"
  else
    echo "run/npu_env.sh: $toolkit/set_env.sh not found; assuming CANN is already on the environment" >&2
  fi
  export ASCEND_RT_VISIBLE_DEVICES="${ASCEND_RT_VISIBLE_DEVICES:-0}"
  export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
  export MASTER_PORT="${MASTER_PORT:-40028}"
  export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}"
  export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1836}"
}

if (return 0 2>/dev/null); then
  # sourced
  _dinobridge_npu_env
else
  set -euo pipefail
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    _dinobridge_npu_usage
    exit 0
  fi
  set +u  # CANN's set_env.sh reads unset variables
  _dinobridge_npu_env
  set -u
  for var in ASCEND_RT_VISIBLE_DEVICES MASTER_ADDR MASTER_PORT HCCL_CONNECT_TIMEOUT HCCL_EXEC_TIMEOUT; do
    echo "$var=${!var}"
  done
  "${PYTHON:-python}" -m dinobridge.distributed.device
fi
