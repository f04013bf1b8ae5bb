#!/usr/bin/env bash
# The GPU check of issue 20, as one prepared script for a machine with an NVIDIA GPU:
#   1. python -m regcore.bench --device cuda for both backbones at 128^3, fp32 and AMP, with
#      MONAI's VoxelMorph as the peer;
#   2. one trial of the paper preset's recipe (seed backbone, seg4 one-hot, Dice + CE) on an
#      embedded 128^3 cohort, a few epochs with AMP, GPU utilisation and memory sampled by
#      nvidia-smi every 0.5 s;
#   3. a smoke sweep with --gpus-per-trial 0.5 (two trials share the GPU), MLflow runs checked.
# Every step writes into OUT; summary.json collects the figures (tests/gpu/summarize.py).
#
#   tests/gpu/run.sh OUT            on the GPU machine (about 6 minutes on one H200)
#   tests/gpu/run.sh OUT --cpu      the CPU fallback: the same steps, tiny, on the CPU
#
# A step whose Python packages are missing (the device machine has torch but not ray, mlflow,
# nibabel, nilearn or monai: carry them as wheels, see docs/GPU.md) is skipped with the reason
# in OUT/<step>.log and summary.json; the script's exit code is the number of failed steps.
set -uo pipefail
OUT=${1:?usage: tests/gpu/run.sh OUT [--cpu]}
MODE=${2:-gpu}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/regablate-gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [ "$MODE" = "--cpu" ]; then
  DEVICE=cpu; SIZE=32; EPOCHS=2; STEPS=3; BENCH=(--smoke --no-monai); GPUS=0; PREC=fp32
  PRECISIONS=(fp32); TRIAL=(--set "model.enc_channels=[4,8,16]" --set "model.dec_channels=[8,4]")
else
  DEVICE=cuda; SIZE=128; EPOCHS=3; STEPS=30; BENCH=(--sizes 128 --repeats 5 --warmup 2); GPUS=0.5
  PREC=amp; PRECISIONS=(fp32 amp); TRIAL=()
fi
failed=0
step() {  # step NAME MODULES... -- COMMAND...: run COMMAND unless a module is missing
  local name=$1; shift
  local mods=()
  while [ "$1" != "--" ]; do mods+=("$1"); shift; done; shift
  local missing
  missing=$("$PY" - "${mods[@]}" <<'PYEOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PYEOF
)
  if [ -n "$missing" ]; then
    echo "skipped: missing Python packages: $missing" | tee "$OUT/$name.log"
    return 0
  fi
  echo "== $name: $*"
  local start=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - start)) s"
  else
    echo "   FAILED ($?) after $((SECONDS - start)) s; tail of $OUT/$name.log:"; tail -5 "$OUT/$name.log"
    failed=$((failed + 1))
  fi
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} >"$OUT/device.txt" 2>&1

# 1. the benchmark, fp32 and AMP (AMP: float16 autocast; on the CPU fallback bf16)
for precision in "${PRECISIONS[@]}"; do
  step "bench_$precision" monai -- "$PY" -m regcore.bench --device "$DEVICE" --backbones vxm seed \
    --precision "$precision" "${BENCH[@]}"
done

# 2. a trial of the paper recipe on the embedded cohort in one-hot form, nvidia-smi sampling
if command -v nvidia-smi >/dev/null 2>&1 && [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits \
    -lms 500 >"$OUT/nvidia_smi.csv" 2>/dev/null &
  SAMPLER=$!
fi
step trial nibabel nilearn -- "$PY" -m regcore.train --variant combined_enhanced \
  --out-dir "$WORK/trial" --epochs "$EPOCHS" --no-progress \
  --set data.embedded_dir="$WORK/embedded" --set "data.shape=[$SIZE,$SIZE,$SIZE]" \
  --set data.modality=seg4_onehot --set model.backbone=seed --set train.device="$DEVICE" \
  --set train.precision="$PREC" --set train.steps_per_epoch="$STEPS" --set data.n_test=4 \
  --set data.embedded_subjects=12 --set train.checkpoint_every="$EPOCHS" "${TRIAL[@]}"
[ -n "${SAMPLER:-}" ] && kill "$SAMPLER" 2>/dev/null
cp "$WORK/trial/metrics.json" "$OUT/trial_metrics.json" 2>/dev/null

# 3. a smoke sweep whose trials share the GPU, and its MLflow runs
step sweep ray mlflow optuna nibabel nilearn -- "$PY" "$ROOT/sweeps/ablation.py" --preset smoke \
  --gpus-per-trial "$GPUS" --set train.device="$DEVICE" --search-trials 0 --no-report \
  --tracking-uri "sqlite:///$WORK/mlflow.db" --storage-path "$WORK/ray" --sweep-id gpu-check
step sweep_runs mlflow -- "$PY" "$ROOT/tests/gpu/summarize.py" check-runs "sqlite:///$WORK/mlflow.db"

"$PY" "$ROOT/tests/gpu/summarize.py" summary "$OUT" "$failed" | tee "$OUT/summary.txt"
exit "$failed"
