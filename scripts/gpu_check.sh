#!/usr/bin/env bash
# One short GPU check of the project: CUDA benchmarks (plain vs fast, GFLOP/s), a small pipeline on
# CUDA (pretrain, metatrain, metatest) and a torchrun run with the NCCL backend.
# Usage: bash scripts/gpu_check.sh OUTDIR   (needs torch with CUDA, click, safetensors, tqdm,
# pyyaml, pillow, matplotlib, scipy, filelock, pytest-benchmark; no dvc/mlflow: tracking off)
set -uo pipefail
out=${1:-/tmp/gpu_check}; mkdir -p "$out"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
py=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/gpu.txt"

echo "== benchmarks on CUDA (the plain yardstick vs the fast path, fast with bf16 and compiled; GFLOP/s lines)"
PURER_BENCH_DEVICE=cuda timeout 330 $py -m pytest tests/benchmarks/test_meta_iteration.py --benchmark-only -o addopts="" -q \
  -p no:cacheprovider --benchmark-group-by=group --benchmark-json="$out/bench_cuda.json" 2>&1 | grep -v "^$" | tail -40

echo "== pipeline on CUDA (Glyph-FS defaults, shortened meta-training)"
root=$(mktemp -d); cp params.yaml "$root/"
sed -i "s/^tracking: true/tracking: false/; s/^episode_train: .*/episode_train: 8000/" "$root/params.yaml"
t0=$(date +%s)
$py -m purer_mlops prepare --root "$root" --quiet > /dev/null && $py -m purer_mlops filelist --root "$root" > /dev/null
t1=$(date +%s); echo "prepare+filelist: $((t1-t0)) s"
$py -m purer_mlops pretrain --root "$root" --quiet > "$out/pretrain.json"; t2=$(date +%s)
echo "pretrain: $((t2-t1)) s"; grep -E '"acc_(mean|min)"' "$out/pretrain.json"
$py -m purer_mlops metatrain --root "$root" --quiet > "$out/metatrain.json"; t3=$(date +%s)
echo "metatrain (2000 it): $((t3-t2)) s"; cat "$out/metatrain.json"
$py -m purer_mlops metatest --root "$root" --quiet > "$out/metatest.json"; t4=$(date +%s)
echo "metatest: $((t4-t3)) s"; cat "$out/metatest.json"

echo "== torchrun --nproc_per_node=1 (NCCL)"
sed -i 's/^episode_train: .*/episode_train: 40/' "$root/params.yaml"; rm -rf "$root/models/meta"
timeout 120 $py -m torch.distributed.run --nproc_per_node=1 -m purer_mlops metatrain --root "$root" --quiet \
  > "$out/torchrun.json" 2> "$out/torchrun.err"; echo "torchrun exit $?"; cat "$out/torchrun.json"
grep -i -E "nccl|error" "$out/torchrun.err" | head -5
