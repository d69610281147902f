#!/bin/bash
# The four multi-GPU runs on one host (README "Multi-GPU"), in order, with their tables at the end:
#   1. correctness: ViT-B, 20 steps on fixed synthetic global batches of 64, bf16: 2 GPUs (FULL_SHARD and
#      SHARD_GRAD_OP) against 1 GPU (benchmarks/multi_gpu.py steps / compare);
#   2. weak scaling: the official ViT-L/16 recipe, batch 64 per GPU, on 1, 2, 4, 8 GPUs up to N (bench_train.py);
#   3. sharded checkpoints: ViT-B, 20 iterations straight on N GPUs vs 10 + resume to 20 on N (exact?), and the
#      iteration-10 checkpoint resumed on N / 2 GPUs (resharded);
#   4. the user's YAML (preset dinov3_vitlarge_pretrain) at full size on N GPUs for 100 iterations, add-ons switched
#      on at iteration 20, then the DTCH / balancer state hashed on every rank.
# Usage: benchmarks/multi_gpu.sh OUT_DIR [N_GPUS]     (N_GPUS: default all visible GPUs)
# PARTS="1 3" runs only those runs (and their tables); default all four.
# EXTRA="key=value ..." is appended to every run (e.g. a CPU dry run with a tiny model, README "Multi-GPU runs").
set -u
OUT=${1:?usage: benchmarks/multi_gpu.sh OUT_DIR [N_GPUS]}
N=${2:-$(python -c "import torch; print(torch.cuda.device_count())")}
EXTRA=${EXTRA:-}
STEPS=${STEPS:-20}
export NCCL_NVLS_ENABLE=0  # NVLink multicast off (the lent machines' notes require it)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")" && pwd)
MG="python $HERE/multi_gpu.py"
run() { echo "+ $*" >> "$OUT/commands.txt"; "$@"; }
launch() { local n=$1; shift; run torchrun --standalone --nproc_per_node="$n" "$@"; }
half=$(( N / 2 > 0 ? N / 2 : 1 ))
PARTS=${PARTS:-1 2 3 4}
want() { [[ " $PARTS " == *" $1 "* ]]; }

# 1. correctness (KoLeo is per rank and stochastic depth draws per rank: both off, so 1 and 2 GPUs must agree)
VITB="student.arch=vit_base student.drop_path_rate=0 dino.koleo_loss_weight=0 dino.koleo_cls_loss_weight=null
  optim.warmup_epochs=0 optim.freeze_last_layer_epochs=0 train.compile=false train.dataset_path=builtin:shapes"
S="steps --config-name official_vitl16_im1k --global-batch 64 --steps $STEPS"
want 1 && run $MG $S --out "$OUT/steps_1.json" $VITB $EXTRA > "$OUT/steps_1.log" 2>&1
want 1 && for strategy in FULL_SHARD SHARD_GRAD_OP; do
  launch 2 "$HERE/multi_gpu.py" $S --out "$OUT/steps_2_$strategy.json" $VITB \
    compute_precision.sharding_strategy=$strategy $EXTRA > "$OUT/steps_2_$strategy.log" 2>&1
done

# 2. weak scaling (every count through FSDP2, a 1-rank group for 1 GPU, so only communication differs)
want 2 && for n in 1 2 4 8; do
  [ "$n" -le "$N" ] || break
  launch "$n" "$HERE/bench_train.py" --config-name official_vitl16_im1k --fsdp --steps 20 --warmup 8 \
    --json "$OUT/scale_$n.json" $EXTRA > "$OUT/scale_$n.log" 2>&1
done

# 3. sharded checkpoints: straight 20 vs 10 + resume on N, and resume of iteration 10 on N / 2 (resharded)
L="-m dinobridge.train --config-name official_vitl16_im1k $VITB train.deterministic=true checkpointing.period=10
  evaluation.knn_period=0 evaluation.knn_at_end=false train.progress_bar=false train.log_period=1"
if want 3; then
  rm -rf "$OUT/ck_straight" "$OUT/ck_resumed" "$OUT/ck_reshard"
  launch "$N" $L --output-dir "$OUT/ck_straight" train.max_iter=20 $EXTRA > "$OUT/ck_straight.log" 2>&1
  launch "$N" $L --output-dir "$OUT/ck_resumed" train.max_iter=10 $EXTRA > "$OUT/ck_resumed_a.log" 2>&1
  cp -r "$OUT/ck_resumed" "$OUT/ck_reshard"
  launch "$N" $L --output-dir "$OUT/ck_resumed" train.max_iter=20 $EXTRA > "$OUT/ck_resumed_b.log" 2>&1
  launch "$half" $L --output-dir "$OUT/ck_reshard" train.max_iter=20 $EXTRA > "$OUT/ck_reshard.log" 2>&1
fi

# 4. the user's YAML at full size on the built-in images (its ImageNet list removed); add-on weights switch on at
#    iteration 20 (0.02 of its 1000-iteration epochs)
RS=resize_shuffle_augmentor
ON=""
for w in resize_paste_loss_weight patch_shuffle_loss_weight bridge_global_weight bridge_patchshuffle_weight; do
  ON="$ON $RS.$w.zero_epochs=0.02 $RS.$w.warmup_epochs=0.01"
done
want 4 && rm -rf "$OUT/user" && launch "$N" -m dinobridge.train --config-name dinov3_vitlarge_pretrain --output-dir "$OUT/user" \
  '~data.imagenet_1k' train.dataset_path=builtin:shapes train.max_iter=${USER_ITERS:-100} \
  checkpointing.period=${USER_ITERS:-100} train.progress_bar=false train.log_period=10 evaluation.knn_period=0 \
  evaluation.knn_at_end=false $ON $EXTRA > "$OUT/user.log" 2>&1

# tables
{
  if want 1; then
    echo "## 1. correctness: 2 GPUs vs 1 GPU, same global batch"
    for strategy in FULL_SHARD SHARD_GRAD_OP; do
      echo "### $strategy"; $MG compare "$OUT/steps_2_$strategy.json" "$OUT/steps_1.json" --rtol "${RTOL:-5e-3}"
    done
  fi
  want 2 && { echo "## 2. weak scaling"; $MG scaling "$OUT"/scale_*.json; }
  if want 3; then
    echo "## 3. sharded checkpoints"
    echo "### resume on $N GPUs vs straight"; $MG resume-compare "$OUT/ck_straight" "$OUT/ck_resumed" | tail -1
    echo "### resume on $half GPU(s) (resharded: not exact by design)"; grep -h "resumed from" "$OUT/ck_reshard.log"
    $MG resume-compare "$OUT/ck_straight" "$OUT/ck_reshard" | tail -1
  fi
  want 4 && { echo "## 4. user's YAML on $N GPUs"; $MG run-summary "$OUT/user"; $MG dtch-hash "$OUT/user"; }
} 2>&1 | tee "$OUT/summary.md"
