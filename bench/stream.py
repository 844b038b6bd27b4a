"""Streaming a folder of images (dataset.stream=true) against a bare DataLoader, and the
in-memory path, measured in the same run.

A folder of generated photos-like images (smooth random blobs; half JPEG, half PNG; the
size given, landscape and portrait) is written once under --dir. Then, alternating the two
sides and taking medians over --repeats:

- images/s of one epoch of vae's streamed batches (decode, resize to --image-size, centre
  crop) with 0, 1 and 2 workers, against a bare `torch.utils.data.DataLoader` over the same
  files with the same decode, resize and crop (torchvision.io, shuffle=True, persistent
  workers), and the ratio;
- images/s of the in-memory path at the same size (batches cut from the uint8 tensor);
- the training step not starved: seconds per epoch of `vae train model=conv` on the folder
  in memory and streamed (2 workers), the same run otherwise;
- --rss: memory (PSS: the process and its workers, shared pages counted once) at the first
  batch and after each of two streamed epochs over the whole folder (a folder whose decoded
  size is far over it: --images 20000 --image-size 256 decodes to 3.8 GB).

    python bench/stream.py                          # 2000 images at 256 px -> 64 px
    python bench/stream.py --images 20000 --image-size 256 --rss   # memory stays flat
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_cli.data.batching import shuffled  # noqa: E402
from vae_cli.data.folder import EXTENSIONS, decode, folder  # noqa: E402


def make_folder(root: Path, n: int, size: int) -> Path:
    """n images, written once (a folder already holding n is reused)."""
    from torchvision.io import write_jpeg, write_png

    if root.is_dir() and len(list(root.rglob("*.*"))) == n:
        return root
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        sub = root / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        h, w = (size, size + size // 4) if i % 2 else (size + size // 4, size)
        blobs = torch.rand(1, 3, 6, 6, generator=g) * 255
        img = torch.nn.functional.interpolate(blobs, size=(h, w), mode="bicubic")[0]
        img = (img + torch.randn(img.shape, generator=g) * 4).clamp(0, 255).to(torch.uint8)
        if i % 2:
            write_png(img, str(sub / f"{i:06d}.png"))
        else:
            write_jpeg(img, str(sub / f"{i:06d}.jpg"), quality=90)
    return root


class Bare(torch.utils.data.Dataset):
    """What a user writes by hand: decode, resize the shorter side, centre crop."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        img = F.resize(decode(self.files[i], 3), [self.size], antialias=True)
        return F.center_crop(img, [self.size, self.size])


def vae_epoch(x, batch: int) -> float:
    start = time.perf_counter()
    n = sum(len(b) for b, _ in shuffled(x, batch, torch.Generator().manual_seed(1)))
    return n / (time.perf_counter() - start)


def bare_epoch(loader) -> float:
    """The batches as a training loop reads them: float in [0, 1], as vae's are."""
    start = time.perf_counter()
    n = sum(len(b.float().div_(255)) for b in loader)
    return n / (time.perf_counter() - start)


def pss_mib() -> float:
    """Proportional resident memory of this process and its children (the DataLoader
    workers): shared pages (copy-on-write, shared-memory batches) counted once overall."""
    me, total = os.getpid(), 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if pid == me or ppid == me:
                rollup = (stat.parent / "smaps_rollup").read_text()
                total += int(rollup.split("Pss:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1024


def throughput(path: Path, args) -> None:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS)
    print(f"| loader, {len(files)} images {args.size} px -> {args.image_size} px, batch "
          f"{args.batch} | bare img/s | vae img/s | vae / bare |")
    print("|---|---|---|---|")
    for workers in (0, 1, 2):
        x = folder(str(path), image_size=args.image_size, stream=True, workers=workers,
                   val_fraction=0.01, test_fraction=0.01).train
        loader = torch.utils.data.DataLoader(
            Bare(files[:len(x)], args.image_size), batch_size=args.batch, shuffle=True,
            drop_last=True, num_workers=workers, persistent_workers=workers > 0)
        ours, theirs = [], []
        for _ in range(args.repeats):  # alternating the two sides
            theirs.append(bare_epoch(loader))
            ours.append(vae_epoch(x, args.batch))
        o, t = statistics.median(ours), statistics.median(theirs)
        print(f"| streamed, {workers} workers | {t:.0f} | {o:.0f} | {o / t:.2f} |", flush=True)
    held = folder(str(path), image_size=args.image_size, root=args.cache,
                  val_fraction=0.01, test_fraction=0.01).train
    speed = statistics.median(vae_epoch(held, args.batch) for _ in range(args.repeats))
    print(f"| in memory (uint8 tensor) | | {speed:.0f} | |")


def epoch_seconds(path: Path, stream: bool, args) -> float:
    """Median seconds per epoch of `vae train model=conv` (from its log), epochs 2.."""
    import re

    from vae_cli.commands.main import main

    run = Path(tempfile.mkdtemp(prefix="vae-stream-bench-"))
    code = main(["train", "dataset=folder", f"dataset.path={path}", f"dataset.root={args.cache}",
                 f"dataset.stream={str(stream).lower()}", "dataset.workers=2",
                 f"dataset.image_size={args.image_size}", "model=conv",
                 f"trainer.batch_size={args.batch}", "trainer.epochs=3", "trainer.image_every=99",
                 "dataset.val_fraction=0.01", "dataset.test_fraction=0.01",
                 f"hydra.run.dir={run}"])
    assert code == 0, code
    times = re.findall(r"epoch \d+/\d+ .*?(\d+\.\d+)s\n", (run / "train.log").read_text())
    return statistics.median(float(t) for t in times[1:])


def memory(path: Path, args) -> None:
    """Memory at the start of a streamed epoch (workers running), at its end, and at the
    end of a second: flat means bounded by the prefetch, not by the folder."""
    x = folder(str(path), image_size=args.image_size, stream=True, workers=2,
               val_fraction=0.01, test_fraction=0.01).train
    order, marks, n = torch.Generator().manual_seed(1), [], 0
    for _ in range(2):
        for b, _ in shuffled(x, args.batch, order):
            if not marks:
                marks.append(pss_mib())  # the first batch: workers started and prefetching
            n += len(b)
        marks.append(pss_mib())
    files = sum(f.stat().st_size for f in path.rglob("*.*")) / 2**20
    decoded = len(x) * 3 * args.image_size ** 2 / 2**20
    print(f"| streamed {n // 2} images an epoch at {args.image_size} px ({files:.0f} MiB of "
          f"files, {decoded:.0f} MiB decoded) | PSS at the first batch {marks[0]:.0f} MiB | "
          f"after epoch 1 {marks[1]:.0f} MiB | after epoch 2 {marks[2]:.0f} MiB |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256, help="the files' shorter side")
    ap.add_argument("--image-size", type=int, default=64, help="what the model reads")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "vae-bench-stream"))
    ap.add_argument("--rss", action="store_true", help="only the memory measurement")
    args = ap.parse_args()
    path = make_folder(Path(args.dir) / f"{args.images}x{args.size}", args.images, args.size)
    args.cache = str(Path(args.dir) / "cache")
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}")
    if args.rss:
        memory(path, args)
        return
    throughput(path, args)
    held, streamed = (epoch_seconds(path, s, args) for s in (False, True))
    print(f"\n| vae train model=conv, {args.image_size} px, s/epoch | in memory | streamed, 2 "
          f"workers | ratio |\n|---|---|---|---|\n| | {held:.2f} | {streamed:.2f} | "
          f"{streamed / held:.2f} |")


if __name__ == "__main__":
    main()
