#!/usr/bin/env bash
# Training recipes side by side at a matched number of epochs, many at once on one GPU:
#
#     bash benchmarks/gpu_sweep.sh OUTDIR JOBFILE
#
# The model-quality targets of BENCHMARKS.md are "10 minutes on the 2-core CPU"; one such run is one
# recipe, one seed. A GPU machine runs the same number of epochs (what the CPU reached in its 10
# minutes: classification 19, segmentation 50 on the unseen phantoms, 133 on the real slices;
# CLS_EPOCHS, SEG_EPOCHS, REAL_EPOCHS) of
# several recipes at once in a few minutes, so a lent GPU answers "which recipe, over which seeds"
# and the CPU then confirms the winner at the real budget. The learning-rate schedule spans the epochs
# instead of the time; everything else (data, split, bf16, augmentation on the device) is train.py's.
#
# JOBFILE: one job per line, run PAR (default 6) at a time, each within JOB_LIMIT seconds (default
# 300), all within BUDGET seconds (default 480); blank lines and lines starting with # are skipped:
#   cls  NAME SEED [train.py flags]   VGG16 on the unseen phantoms (the split in SPLIT, default: a new
#                                     seeded one), then eval_classifier.py on 10 held-out phantoms,
#                                     best.ckpt and last.ckpt
#   seg  NAME SEED [train.py flags]   U-Net (--image-size 128 --base-width 16), then predict_segmentation.py
#                                     and evaluate.py on the held-out phantoms
#   demo NAME [train.py flags]        the README's classification demo (--demo)
#   real NAME SEED [train.py flags]   U-Net on the real slices in REAL_DIR (default
#                                     ../shared/data/real-liver-slices; --image-size 128 --base-width 16
#                                     --context-slices 0, the split in SPLIT), test Dice per slice
# A line may start with environment settings (SPLIT=... real ...). TRAIN (default train.py) is the
# training script: a wrapper that patches a default not yet exposed as a flag can stand in for it.
# Writes OUTDIR/results.txt (one line per job, appended as jobs end), OUTDIR/progress.txt and
# OUTDIR/logs.tar.gz (every job's logs and JSON: few files, so that all of them come back).
set -u
out=${1:?usage: bash benchmarks/gpu_sweep.sh OUTDIR JOBFILE}
jobs=${2:?usage: bash benchmarks/gpu_sweep.sh OUTDIR JOBFILE}
mkdir -p "$out/logs"
export OUT=$(cd "$out" && pwd) PY=${PYTHON:-python3} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export WORK=${WORK:-/tmp/sweep} ACC=${ACC:-gpu} DEV=${DEV:-cuda} CLS_EPOCHS=${CLS_EPOCHS:-19} SEG_EPOCHS=${SEG_EPOCHS:-50}
export REAL_EPOCHS=${REAL_EPOCHS:-133} REAL_DIR=${REAL_DIR:-../shared/data/real-liver-slices} TRAIN=${TRAIN:-train.py}
export SPLIT=${SPLIT:-} T0=$(date +%s)
mkdir -p "$WORK"
{ nvidia-smi -L; nproc; $PY -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)"
} >"$OUT/machine.txt" 2>&1

# The data: the unseen phantoms (train, validation, test), 10 held-out ones, the demo set.
[ -d "$WORK/unseen" ] || $PY benchmarks/unseen_phantoms.py --out-dir "$WORK/unseen" >/dev/null &
[ -d "$WORK/heldout" ] || $PY benchmarks/unseen_phantoms.py --out-dir "$WORK/heldout" --seed 99 --cases 10 >/dev/null &
$PY -c "import train; train.ensure_data(train.get_args_parser().parse_args(['--task', 'classification']))" 2>/dev/null &
wait
$PY dataset.py prepare --data-dir "$WORK/unseen" --cache-dir "$WORK/cache" --image-size 128 2>>"$OUT/progress.txt"
$PY dataset.py prepare --data-dir data/synthetic --cache-dir "$WORK/cache_demo" --image-size 128 2>>"$OUT/progress.txt"
[ ! -d "$REAL_DIR" ] || $PY dataset.py prepare --data-dir "$REAL_DIR" --cache-dir "$WORK/cache_real" --image-size 128 \
  2>>"$OUT/progress.txt"
echo "data ready after $(($(date +%s) - T0)) s" >>"$OUT/progress.txt"

field() {  # field FILE KEY...: "key value" for each JSON key found in FILE
  local f=$1 k; shift
  for k in "$@"; do grep -o "\"$k\": [-0-9.eEnaNul]*" "$f" 2>/dev/null | head -1 | tr -d '"'; done | tr '\n' ' '
}
train_run() {  # train_run NAME TRAIN.PY-FLAGS...: one training into $WORK/runs/NAME, its log in logs/NAME.train.log
  local name=$1; shift  # the job's own flags come last, so they override these
  timeout "${JOB_LIMIT:-300}" $PY "$TRAIN" --accelerator "$ACC" --num-workers 2 --output-dir "$WORK/runs/$name" \
    --graphs-dir "$WORK/runs/$name/graphs" "$@" >"$OUT/logs/$name.train.log" 2>&1
}
cls() {  # cls NAME SEED FLAGS...
  local name=cls_$1_s$2 seed=$2 w; shift 2
  local d=$WORK/runs/$name
  train_run "$name" --task classification --data-dir "$WORK/unseen" --cache-dir "$WORK/cache" --image-size 128 \
    --max-epochs "$CLS_EPOCHS" --seed "$seed" ${SPLIT:+--split-file "$SPLIT"} "$@"
  for w in best last; do
    timeout 90 $PY benchmarks/eval_classifier.py --checkpoint "$d/checkpoints/$w.ckpt" --data-dir "$WORK/heldout" \
      --device "$DEV" >"$OUT/logs/$name.$w.json" 2>"$OUT/logs/$name.$w.err"
  done
  echo "$name | $* | $(field "$d/test_metrics.json" epochs test/auroc)| held-out best: $(field "$OUT/logs/$name.best.json" \
    slice_auroc volume_auroc)| last: $(field "$OUT/logs/$name.last.json" slice_auroc volume_auroc)| t=$(($(date +%s) - T0))" >>"$OUT/results.txt"
}
seg() {  # seg NAME SEED FLAGS...
  local name=seg_$1_s$2 seed=$2; shift 2
  local d=$WORK/runs/$name
  train_run "$name" --task segmentation --data-dir "$WORK/unseen" --cache-dir "$WORK/cache" --image-size 128 \
    --base-width 16 --max-epochs "$SEG_EPOCHS" --seed "$seed" ${SPLIT:+--split-file "$SPLIT"} "$@"
  timeout 120 $PY predict_segmentation.py --checkpoint "$d/checkpoints/best.ckpt" --input "$WORK/heldout" \
    --output "$d/pred" --device "$DEV" >"$OUT/logs/$name.pred.log" 2>&1
  timeout 60 $PY evaluate.py --pred "$d/pred" --gt "$WORK/heldout" --summary "$OUT/logs/$name.summary.json" \
    >"$OUT/logs/$name.eval.log" 2>&1
  echo "$name | $* | $(field "$d/test_metrics.json" epochs test/dice_liver_per_case test/dice_tumor_per_case)| held-out: \
$(field "$OUT/logs/$name.summary.json" mean_dice_liver mean_dice_tumor dice_global_tumor)| t=$(($(date +%s) - T0))" >>"$OUT/results.txt"
}
demo() {  # demo NAME FLAGS...
  local name=demo_$1; shift
  train_run "$name" --task classification --demo --cache-dir "$WORK/cache_demo" "$@"
  echo "$name | $* | $(field "$WORK/runs/$name/test_metrics.json" epochs test/auroc test/auroc_volume)| t=$(($(date +%s) - T0))" \
    >>"$OUT/results.txt"
}
real() {  # real NAME SEED FLAGS...
  local name=real_$1_s$2 seed=$2; shift 2
  train_run "$name" --task segmentation --data-dir "$REAL_DIR" --cache-dir "$WORK/cache_real" --image-size 128 \
    --base-width 16 --context-slices 0 --max-epochs "$REAL_EPOCHS" --seed "$seed" ${SPLIT:+--split-file "$SPLIT"} "$@"
  echo "$name | SPLIT=${SPLIT##*/} $* | $(field "$WORK/runs/$name/test_metrics.json" epochs test/dice_liver_per_slice \
    test/dice_liver_per_case)| t=$(($(date +%s) - T0))" >>"$OUT/results.txt"
}
export -f field train_run cls seg demo real
grep -Ev '^[[:space:]]*(#|$)' "$jobs" >"$OUT/jobs.txt"
timeout "${BUDGET:-480}" xargs -P "${PAR:-6}" -I{} bash -c '{}' <"$OUT/jobs.txt"
echo "sweep ended after $(($(date +%s) - T0)) s" >>"$OUT/progress.txt"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
