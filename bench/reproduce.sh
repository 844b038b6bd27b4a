#!/usr/bin/env bash
# Rerun one row of the Reproductions table (docs/reproductions.md): train a preset to its own stopping rule
# (early stopping on the validation split), then score the best checkpoint on the full test
# split with the IWAE bound at k = 5000. Resumable: run it again after an interruption and
# training continues from the run folder's last checkpoint.
#   bash bench/reproduce.sh vamp_binarized_mnist [more overrides...]
#   MNIST_ROOT=/data bash bench/reproduce.sh vae_gated_binarized_mnist
#   bash bench/reproduce.sh vamp_binarized_mnist trainer.cuda_graph=true -- eval.iw_batch=50000
# Arguments after `--` go to the final `vae eval` (on a GPU, a larger eval.iw_batch).
# Writes $VAE_REPRO_DIR/<preset>/ (default ~/vae-runs, outside the work tree so that a fresh
# checkout keeps the runs; checkpoints, metrics.csv, eval.json, wall.txt); a budget per
# invocation: trainer.max_minutes=N. `python bench/repro_table.py` prints the table's rows.
# Trains compiled (trainer.compile=true; later arguments may say false): measured with
# bench/compile.py on one CPU thread, a compiled step takes 0.46x the eager time for
# vamp_binarized_mnist and 0.68x for vae_gated_binarized_mnist.
set -euo pipefail
preset=${1:?usage: bench/reproduce.sh <experiment preset> [train overrides...] [-- eval overrides...]}
shift
train=() evals=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do train+=("$1"); shift; done
[ $# -gt 0 ] && shift && evals=("$@")
run=${VAE_REPRO_DIR:-$HOME/vae-runs}/$preset
root=${MNIST_ROOT:-../shared/data}
mkdir -p "$run"
start=$(date +%s)
stage=train
# Every invocation that trained adds its wall time, stopped or not, so the row's total is their sum.
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -1)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
# A start refused before any work leaves no record (nor a file that makes the next start a resume).
trap 'rc=$?; [ -d "$run/checkpoints" ] && echo "$(( $(date +%s) - start )) s on $(uname -n), ${cpu:-$(uname -m)}, $(nproc --all) cores${gpu:+, $gpu}, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}: $stage, exit $rc" >> "$run/wall.txt"' EXIT
vae train "experiment=$preset" "dataset.root=$root" dataset.download=false \
    trainer.resume=auto trainer.compile=true "hydra.run.dir=$run" ${train[@]+"${train[@]}"}
# A stage ended by trainer.max_minutes is not the row's end: score it when training is done.
if tail -n 5 "$run/train.log" | grep -q "time limit:"; then exit 0; fi
stage="train + eval"
vae eval "ckpt=$run/checkpoints/best.pt" eval.iw_samples=5000 eval.split=test \
    "dataset.root=$root" ${evals[@]+"${evals[@]}"}
