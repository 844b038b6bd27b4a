#!/usr/bin/env bash
# The GPU checks, in one command of at most 8 minutes on one GPU: vae's training step against
# a bare PyTorch loop of the same networks on GPU-resident data (MLP 784-400-20 batch 128,
# conv 64x64 batch 256, conv 64x64 under bf16, MLP with vae compiled, and vae's step captured
# in a CUDA graph, trainer.cuda_graph=true, for the MLP and conv64: targets >= 6x and >= 1.8x
# the bare eager loop's images/s), then whether a compiled convolutional model trains like the
# eager one on this torch (3 epochs of shapes 64x64 each way; vae refuses trainer.compile=true
# with convolutions on CUDA unless VAE_COMPILE_CONV_CUDA=1, which this check sets), then the
# VampPrior reproduction preset for 10 epochs on the graph path (MNIST from $MNIST_ROOT,
# default ../shared/data; skipped without it). Prints one table last.
#   bash bench/gpu_check.sh            (from the repository root, vae installed)
set -u
cd "$(dirname "$0")/.."
out=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || exit 1
run() {  # name, then bench/speed.py arguments
    local name=$1; shift
    timeout 150 python bench/speed.py --device cuda --epochs 3 "$@" > "$out/$name.txt" 2>&1
    echo "--- $name (exit $?)"; tail -n 4 "$out/$name.txt"
}
run mlp --only mlp --batch 128 --n 60000
run conv64 --only conv --size 64 --batch 256 --n 20000
run conv64-bf16 --only conv --size 64 --batch 256 --n 20000 --precision bf16
run mlp-compiled --only mlp --batch 128 --n 60000 --compile
run mlp-graph --only mlp --batch 128 --n 60000 --cuda-graph
run conv64-graph --only conv --size 64 --batch 256 --n 20000 --cuda-graph
for c in false true; do
    VAE_COMPILE_CONV_CUDA=1 timeout 240 vae train model=conv dataset=shapes \
        dataset.image_size=64 dataset.n_train=8192 trainer.batch_size=256 trainer.epochs=3 \
        trainer.device=cuda trainer.compile=$c hydra.run.dir="$out/compile_$c" \
        > "$out/compile_$c.log" 2>&1
    echo "--- conv compile=$c (exit $?)"; tail -n 2 "$out/compile_$c.log"
done
mnist=${MNIST_ROOT:-../shared/data}
if [ -d "$mnist/MNIST/raw" ]; then
    timeout 150 vae train experiment=vamp_binarized_mnist "dataset.root=$mnist" \
        dataset.download=false trainer.epochs=10 trainer.cuda_graph=true trainer.device=cuda \
        trainer.pictures=false "hydra.run.dir=$out/vamp" > "$out/vamp.log" 2>&1
    echo "--- vamp_binarized_mnist, 10 epochs, cuda_graph (exit $?)"; tail -n 2 "$out/vamp.log"
fi
python - "$out" <<'PY'
import csv, re, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print("\ncase           bare s/epoch   vae s/epoch   vae/bare")
for name in ("mlp", "conv64", "conv64-bf16", "mlp-compiled", "mlp-graph", "conv64-graph"):
    rows = [l.split() for l in (out / f"{name}.txt").read_text().splitlines()
            if l.split()[:1] and l.split()[0].startswith(("mlp", "conv"))]
    cells = rows[-1][1:4] if rows else ["-", "-", "failed"]
    print(f"{name:<14} {cells[0]:>12} {cells[1]:>13} {cells[2]:>10}")
for c in ("false", "true"):
    f = out / f"compile_{c}" / "metrics.csv"
    losses = [r["val_loss"] for r in csv.DictReader(f.open())] if f.is_file() else ["failed"]
    print(f"conv64 compile={c:<5} val loss per epoch: {', '.join(losses)}")
log = out / "vamp" / "train.log"
if log.is_file():  # 50,000 training images an epoch; the first epoch captures the graph
    secs = [float(m) for m in re.findall(r"epoch \d+/\d+ .*?([\d.]+)s$", log.read_text(), re.M)]
    rows = list(csv.DictReader((out / "vamp" / "metrics.csv").open()))
    if len(secs) > 1 and rows:
        print(f"vamp_binarized_mnist cuda_graph: {50000 / statistics.median(secs[1:]):.0f} img/s,"
              f" val loss {rows[-1]['val_loss']} after {len(rows)} epochs")
PY
