#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one go, for a session that has a CUDA machine for minutes:
#
#     bash benchmarks/gpu_run.sh OUTDIR SEG_CKPT [STEP ...]
#
# SEG_CKPT: a segmentation checkpoint of the default architecture trained on phantoms (the fast path's
# region finding must see a liver). Each step's output goes to OUTDIR/<step>.txt; a step that fails or
# runs past its limit is recorded and the next one runs. All steps together take about 12 minutes on
# an H200 machine, more than one call of a lent device may last: name the steps to run (default: all),
# listed here in order of what they answer:
#   train          training images/s and MFU in bf16, both layouts, fed from memory and by LiTSDataModule
#   predict        slices/s of batched prediction against a one-slice loop (random U-Net, 200 slices);
#                  then end to end, process start to NIfTI written: fast path vs --exact on CUDA
#   tests          the test suite's CUDA tests and the rest of the prediction tests, CUDA visible
#   lightning      train.py itself on CUDA in bf16 for a minute (demo data), then predict with its checkpoint
#   train_big      training at a larger batch (what a GPU run would use), channels-last
#   train_compile  that with torch.compile
set -u
out=${1:?usage: bash benchmarks/gpu_run.sh OUTDIR SEG_CKPT [STEP ...]}
ckpt=${2:?usage: bash benchmarks/gpu_run.sh OUTDIR SEG_CKPT [STEP ...]}
shift 2
steps=" ${*:-train predict tests lightning train_big train_compile} "
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: runs it if NAME was asked for
    local name=$1 limit=$2 start rc
    shift 2
    [[ $steps == *" $name "* ]] || return 0
    echo "== $name: $*" >"$out/$name.txt"
    start=$(date +%s)
    timeout "$limit" "$@" >>"$out/$name.txt" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - start)) s" >>"$out/$name.txt"
    tail -n 4 "$out/$name.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc; uname -r
  $py -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)"
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

bench="$py benchmarks/bench_train.py --device cuda --precision bf16-mixed --warmup 5 --steps 20"
step train 200 $bench --channels-last both --loader --num-workers 8
step predict 180 bash -c "$py benchmarks/bench_predict.py --throughput --device cuda --slices 200 --batch-size 64 \
    --ablation --repeats 3 && $py benchmarks/bench_predict.py --checkpoint '$ckpt' --device cuda --repeats 2"
step tests 180 $py -m pytest -q -p no:cacheprovider tests/test_predict.py tests/test_inference.py
step lightning 120 bash -c "$py train.py --task segmentation --demo --accelerator gpu --precision bf16-mixed \
    --max-time 00:00:01:00 --output-dir /tmp/gpu_seg --graphs-dir /tmp/gpu_graphs --cache-dir /tmp/gpu_cache \
    && $py predict_segmentation.py --checkpoint /tmp/gpu_seg/checkpoints/best.ckpt --device cuda \
       --input data/synthetic/volume-0.nii --output /tmp/gpu_pred.nii.gz"
step train_big 45 $bench --channels-last on --models unet512 vgg224 --batch-size 64
step train_compile 180 $bench --channels-last on --models unet512 vgg224 --batch-size 64 --compile
