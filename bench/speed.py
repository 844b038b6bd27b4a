"""Seconds per training epoch of `vae` against a bare PyTorch loop of the same model.

Both run in this process on the same preloaded uint8 data (MNIST-shaped, generated, or
real MNIST with --mnist-root), same batch, same Adam hyperparameters, same threads. The
bare loop is the pytorch/examples VAE written directly (no components, no metrics), with
torch.optim.Adam's default implementation; vae's uses the fused update where torch has one,
as `vae train` does. Prints a table of
median epoch times and their ratio, and exits non-zero when a ratio misses its target.

The text case is a GRU sentence VAE (vae's model=rnn defaults, batch 32) on a generated
Zipfian corpus written as the files dataset=text reads; its bare loop trims each batch to
its longest line, packs the encoder's input and projects real positions only. ``--vae-root``
times another checkout's vae against the same bare loop (e.g. an older commit's, exported
with ``git archive``), which is how the speed-up over an earlier version is measured.

    python bench/speed.py                 # mlp 784-400-20, conv 32x32, iwae, text
    python bench/speed.py --epochs 5 --only mlp --precision bf16
    python bench/speed.py --only text --bucket              # vae with trainer.bucket=true
    python bench/speed.py --only text --vae-root /tmp/old   # an older vae, same bare loop
    python bench/speed.py --memory        # peak RSS of an MNIST-sized mlp epoch
    python bench/speed.py --device cuda --only conv --size 64 --batch 256   # on a GPU
    python bench/speed.py --device cuda --only mlp --cuda-graph   # the captured step
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


def _vae_root() -> str:
    """The checkout whose vae_cli is timed: this one, or --vae-root's (read before the
    imports below, which it decides)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--vae-root", default=str(Path(__file__).resolve().parents[1]))
    return p.parse_known_args()[0].vae_root


sys.path.insert(0, _vae_root())

from hydra import compose, initialize_config_dir  # noqa: E402

from vae_cli.commands.main import register_resolvers  # noqa: E402
from vae_cli.config.build import build_objective  # noqa: E402
from vae_cli.config.registry import config_dir  # noqa: E402
from vae_cli.config.schemas import validate_train  # noqa: E402
from vae_cli.data.base import ImageData, Splits  # noqa: E402
from vae_cli.tokens import BOS, PAD  # noqa: E402
from vae_cli.training.graph import graph_safe  # noqa: E402
from vae_cli.training.loop import train_epoch  # noqa: E402
from vae_cli.training.optimizers import build_optimizer  # noqa: E402
from vae_cli.training.recipe import training_net  # noqa: E402
from vae_cli.training.state import TrainState  # noqa: E402
from vae_cli.training.step import Stepper  # noqa: E402

# time ratios vae / bare; iwae's throughput target >= 0.9 x bare is a time ratio <= 1/0.9
TARGETS = {"mlp": 1.10, "conv": 1.15, "iwae": 1 / 0.9, "text": 1.10}
# --cuda-graph: vae's captured step against the bare *eager* loop (>= 6x and >= 1.8x the
# bare loop's images/s on the MLP and conv64)
GRAPH_TARGETS = {"mlp": 1 / 6, "conv": 1 / 1.8}


class BareMLP(nn.Module):
    """pytorch/examples/vae: 784-400-20."""

    def __init__(self, d: int = 784, h: int = 400, z: int = 20):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(d, h), nn.Linear(h, z), nn.Linear(h, z)
        self.fc3, self.fc4 = nn.Linear(z, h), nn.Linear(h, d)

    def forward(self, x):
        h = F.relu(self.fc1(x.flatten(1)))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.fc4(F.relu(self.fc3(z))).view_as(x), mu, logvar


class BareConv(nn.Module):
    """The same layers as vae's model=conv: 4x4 stride-2 convs from 32 channels, doubled per
    block, down to 4x4 (32x32: 32-64-128; 64x64: 32-64-128-256), fc 256."""

    def __init__(self, c: int = 1, z: int = 20, size: int = 32):
        super().__init__()
        widths = [c, 32]
        while size // 2 ** len(widths[1:]) > 4:
            widths.append(widths[-1] * 2)
        flat = widths[-1] * 16
        enc: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            enc += [nn.Conv2d(a, b, 4, 2, 1), nn.ReLU()]
        self.enc = nn.Sequential(*enc, nn.Flatten(), nn.Linear(flat, 256), nn.ReLU(),
                                 nn.Linear(256, 2 * z))
        dec: list[nn.Module] = [nn.Linear(z, 256), nn.ReLU(), nn.Linear(256, flat), nn.ReLU(),
                                nn.Unflatten(1, (widths[-1], 4, 4))]
        for a, b in zip(widths[:0:-1], widths[-2::-1], strict=True):
            dec += [nn.ConvTranspose2d(a, b, 4, 2, 1), nn.ReLU()]
        self.dec = nn.Sequential(*dec[:-1])  # no activation on the logits

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.dec(z), mu, logvar


def bare_epoch(model, opt, x_u8: torch.Tensor, batch: int, gen: torch.Generator) -> None:
    perm = torch.randperm(len(x_u8), generator=gen).to(x_u8.device)
    for i in range(0, len(x_u8) - batch + 1, batch):
        x = x_u8[perm[i:i + batch]].float().div_(255)
        logits, mu, logvar = model(x)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        loss = (recon + kl) / len(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def vae_setup(overrides: list[str], x_u8: torch.Tensor):
    """vae's own training epoch; also returns a function scoring the loss on held-out data."""
    data = ImageData(name="bench", train=x_u8[:-2000], val=x_u8[-2000:], test=x_u8[-2000:])
    return vae_epoch(overrides, data)


def vae_epoch(overrides: list[str], data: Splits):
    """vae's training epoch on ``data`` as `vae train` runs it (on trainer.device, the data
    moved there first, as `vae train` does), and its validation loss."""
    from vae_cli.evaluation.evaluate import evaluate
    from vae_cli.runtime.device import resolve_device

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = validate_train(compose(config_name="train", overrides=overrides))
    vocab = len(data.vocab) if data.vocab else None
    device = resolve_device(cfg.trainer.device)
    data = data.to(device)
    objective = build_objective(cfg, data.shape, len(data.train), vocab).to(device)
    t = cfg.trainer
    capture = t.cuda_graph and device.type == "cuda"
    opt = build_optimizer(cfg.optim, objective.main_parameters(), t.compile, capture)
    state = TrainState()
    gen = torch.Generator().manual_seed(0)
    net = training_net(objective, opt, t.compile, device)
    stepper = Stepper(net, objective, opt, device, t.precision)
    if t.cuda_graph:
        stepper = graph_safe(stepper, capture)
    return (lambda: train_epoch(stepper, data, cfg.trainer, gen, state, desc="bench"),
            lambda: evaluate(objective, data.val, 500)["loss"])


def zipf_corpus(folder: Path, lines: int, types: int, max_length: int, seed: int = 0
                ) -> dict[str, str]:
    """train/val/test files of a generated corpus with natural text's long tails: type r
    (of ``types``, all in the training file) is the r-th most frequent, its count ~ 1/r
    (Zipf) over a floor of one; line lengths are log-normal (median 10 tokens, three in
    four under 15) with 1% of lines near ``max_length``. Returns dataset=text's paths."""
    g = torch.Generator().manual_seed(seed)
    n = torch.exp(2.3 + 0.6 * torch.randn(lines, generator=g)).round().clamp(1, max_length)
    tail = torch.rand(lines, generator=g) < 0.01
    n[tail] = torch.randint(max_length * 3 // 4, max_length + 1, (int(tail.sum()),),
                            generator=g).float()
    n = n.long()
    total = int(n.sum())
    if total < types:
        raise SystemExit(f"--text-lines {lines} hold {total} tokens, too few for "
                         f"--text-types {types}")
    zipf = 1 / torch.arange(1, types + 1, dtype=torch.float64)
    counts = 1 + ((total - types) * zipf / zipf.sum()).long()
    counts[0] += total - int(counts.sum())  # the rounding's remainder to the top word
    tokens = torch.repeat_interleave(torch.arange(types), counts)
    tokens = tokens[torch.randperm(total, generator=g)].tolist()
    ends = n.cumsum(0).tolist()
    text = {"train": [tokens[e - k:e] for e, k in zip(ends, n.tolist(), strict=True)]}
    for split in ("val", "test"):  # held-out lines of the same distribution
        ids = torch.multinomial(zipf, lines // 20 * 12, replacement=True, generator=g)
        text[split] = ids.view(-1, 12).tolist()
    paths = {}
    for split, rows in text.items():
        path = folder / f"{split}.txt"
        path.write_text("\n".join(" ".join(f"w{t}" for t in r) for r in rows) + "\n")
        paths["path" if split == "train" else f"{split}_path"] = str(path)
    return paths


class BareSentenceVAE(nn.Module):
    """A GRU sentence VAE written directly, layer for layer vae's model=rnn (one embedding
    table, decoder state tanh(Linear(z))): each batch trimmed to its longest line and the
    encoder's input packed, as reference implementations do, and the vocabulary projection
    on real positions only."""

    def __init__(self, vocab: int, e: int = 300, h: int = 256, z: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, e, padding_idx=PAD)
        self.enc, self.dec = nn.GRU(e, h, batch_first=True), nn.GRU(e, h, batch_first=True)
        self.head, self.init, self.out = nn.Linear(h, 2 * z), nn.Linear(z, h), nn.Linear(h, vocab)

    def forward(self, x):
        n = (x != PAD).sum(1)
        x = x[:, :int(n.max())]
        packed = pack_padded_sequence(self.embed(x), n, batch_first=True, enforce_sorted=False)
        mu, logvar = self.head(self.enc(packed)[1][-1]).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        prev = torch.cat([torch.full_like(x[:, :1], BOS), x[:, :-1]], dim=1)
        h, _ = self.dec(self.embed(prev), torch.tanh(self.init(z))[None])
        real = x != PAD
        recon = F.cross_entropy(self.out(h[real]), x[real], reduction="sum")
        return recon, mu, logvar


def bare_text_epoch(model, opt, x: torch.Tensor, batch: int, gen: torch.Generator) -> None:
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x) - batch + 1, batch):
        recon, mu, logvar = model(x[perm[i:i + batch]])
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        loss = (recon + kl) / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def text_case(args) -> tuple[tuple, float]:
    """(row, vae's val loss) of the sentence VAE on a generated Zipfian corpus."""
    from vae_cli.data.text import text

    with tempfile.TemporaryDirectory() as tmp:
        paths = zipf_corpus(Path(tmp), args.text_lines, args.text_types, 64)
        data = text(**paths, max_length=64)
        ov = ["dataset=text", "dataset.max_length=64", "model=rnn", "loss=categorical",
              "model.word_dropout=0", "schedule=constant",  # as the bare loop
              *(f"dataset.{k}={v}" for k, v in paths.items()), "trainer.device=cpu",
              f"trainer.batch_size={args.text_batch}", f"trainer.precision={args.precision}",
              f"trainer.compile={args.compile}", *(["trainer.bucket=true"] * args.bucket)]
        epoch, score = vae_epoch(ov, data)
    print(f"text: {len(data.train)} training lines, {int((data.train != PAD).sum())} "
          f"tokens with <eos>, {len(data.vocab)} types")
    bare = BareSentenceVAE(len(data.vocab))
    opt = torch.optim.Adam(bare.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    t_bare, t_vae = median_times(
        [partial(bare_text_epoch, bare, opt, data.train, args.text_batch, gen), epoch],
        args.epochs)
    label = "text-bucket" if args.bucket else "text"
    return (label, t_bare, t_vae, t_vae / t_bare, TARGETS["text"]), score()


@torch.no_grad()
def bare_iwae(model: BareMLP, x_u8: torch.Tensor, k: int, batch: int) -> float:
    """log p(x) by importance sampling, written directly: the reference for throughput."""
    total = 0.0
    for i in range(0, len(x_u8), batch):
        x = x_u8[i:i + batch].float().div_(255).flatten(1)
        h = F.relu(model.fc1(x))
        mu, logvar = model.fc21(h), model.fc22(h)
        std = torch.exp(0.5 * logvar)
        eps = torch.randn(k, *mu.shape)
        z = mu + eps * std
        logits = model.fc4(F.relu(model.fc3(z)))
        log_px = -F.binary_cross_entropy_with_logits(
            logits, x.expand(k, -1, -1), reduction="none").sum(-1)
        log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
        log_qz = -0.5 * (eps.pow(2) + math.log(2 * math.pi)).sum(-1) - std.log().sum(-1)
        total += (torch.logsumexp(log_px + log_pz - log_qz, 0) - math.log(k)).sum().item()
    return total / len(x_u8)


def vae_iwae(x_u8: torch.Tensor, k: int, batch: int):
    from vae_cli.evaluation.likelihood import iwae_bound

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = validate_train(compose(config_name="train", overrides=[
            "model=mlp", "model.hidden=[400]", "model.latent_dim=20"]))
    model = build_objective(cfg, tuple(x_u8.shape[1:]), len(x_u8)).model.eval()
    return lambda: iwae_bound(model, x_u8, k, batch, max_decoded=k * batch)


def median_times(fns, epochs: int) -> list[float]:
    """Median seconds per call of each function, calls interleaved (a, b, b, a, a, b, ...)
    so that drift in the machine's speed hits both sides alike and neither always runs
    first."""
    fns = [synced(fn) for fn in fns]
    for fn in fns:
        fn()  # warm-up: allocator, kernels, lazy init, compilation
    if epochs == 0:
        return [math.nan] * len(fns)
    times: list[list[float]] = [[] for _ in fns]
    for i in range(epochs):
        order = list(zip(fns, times, strict=True))
        for fn, ts in order[::-1] if i % 2 else order:
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def synced(fn):
    """fn, returning only once the GPU has finished its queued work (CUDA runs ahead)."""
    def call():
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return call


def data(kind: str, n: int, mnist_root: str | None, size: int = 32) -> torch.Tensor:
    if mnist_root and kind == "mlp":
        from torchvision.datasets import MNIST
        return MNIST(mnist_root, train=True, download=False).data.unsqueeze(1)[:n]
    # Structured stand-in (learnable, unlike noise): shapes sprites at MNIST's 28x28 / 32x32.
    from vae_cli.data.shapes import render, sample_factors

    size = 28 if kind == "mlp" else size
    return render(sample_factors(n, torch.Generator().manual_seed(0)), size)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per side (median)")
    p.add_argument("--n", type=int, default=60000, help="training images")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--only", choices=sorted(TARGETS))
    p.add_argument("--iw-samples", type=int, default=100, help="k for the iwae row (2000 images)")
    p.add_argument("--mnist-root", help="real MNIST (torchvision layout) for the mlp case")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="vae side's trainer.precision (the bare loop stays fp32)")
    p.add_argument("--compile", action="store_true",
                   help="vae side with trainer.compile=true (the bare loop stays eager)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="vae with trainer.cuda_graph=true (targets: x the bare eager loop)")
    p.add_argument("--memory", action="store_true", help="compare peak RSS instead")
    p.add_argument("--device", default="cpu", help="cpu | cuda: mlp and conv cases, data "
                   "resident on the device for both sides")
    p.add_argument("--size", type=int, default=32, choices=[32, 64], help="conv image size")
    p.add_argument("--text-lines", type=int, default=4000, help="training lines (text)")
    p.add_argument("--text-types", type=int, default=32000, help="vocabulary (text)")
    p.add_argument("--text-batch", type=int, default=32)
    p.add_argument("--bucket", action="store_true",
                   help="text: vae side with trainer.bucket=true (the bare loop does not)")
    p.add_argument("--vae-root", help="time this checkout's vae_cli (default: this one)")
    p.add_argument("--side", choices=["bare", "vae"], help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.manual_seed(0)
    if args.memory:
        return memory(args)
    rows, ok, losses = [], True, {}
    for kind in [args.only] if args.only else list(TARGETS):
        if kind == "text":
            row, loss = text_case(args)
            rows.append(row)
            losses[row[0]] = loss
            ok &= row[3] <= TARGETS[kind]
            continue
        x = data("mlp" if kind == "iwae" else kind, args.n, args.mnist_root, args.size)
        if kind == "iwae":
            xs, k = x[:2000], args.iw_samples
            bare = BareMLP().eval()
            t_bare, t_vae = median_times([partial(bare_iwae, bare, xs, k, 100),
                                          vae_iwae(xs, k, 100)], args.epochs)
            rows.append((kind, t_bare, t_vae, t_vae / t_bare, TARGETS[kind]))
            ok &= t_vae / t_bare <= TARGETS[kind]
            continue
        if kind == "mlp":
            bare = BareMLP()
            ov = ["model=mlp", "model.hidden=[400]", "model.latent_dim=20"]
        else:
            bare = BareConv(size=args.size)
            ov = ["model=conv", "model.latent_dim=20"]
        bare, x = bare.to(args.device), x.to(args.device)
        ov += [f"trainer.batch_size={args.batch}", f"trainer.device={args.device}",
               f"trainer.precision={args.precision}", f"trainer.compile={args.compile}",
               f"trainer.cuda_graph={args.cuda_graph}"]
        if args.side == "vae":  # memory mode: one side per process
            epoch, _ = vae_setup(ov, x)
            epoch()
            return report_rss()
        opt = torch.optim.Adam(bare.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        if args.side == "bare":
            bare_epoch(bare, opt, x[:-2000], args.batch, gen)
            return report_rss()
        epoch, score = vae_setup(ov, x)
        t_bare, t_vae = median_times(
            [partial(bare_epoch, bare, opt, x[:-2000], args.batch, gen), epoch], args.epochs)
        ratio = t_vae / t_bare
        target = (GRAPH_TARGETS if args.cuda_graph else TARGETS)[kind]
        ok &= ratio <= target
        label = kind + (str(args.size) if kind == "conv" and args.size != 32 else "")
        label += "" if args.precision == "fp32" else f"-{args.precision}"
        label += "-compiled" if args.compile else ""
        label += "-graph" if args.cuda_graph else ""
        rows.append((label, t_bare, t_vae, ratio, target))
        losses[label] = score()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, n={args.n}, "
          f"batch {args.batch}, median of {args.epochs} epochs")
    print(f"vae_cli from {Path(sys.modules['vae_cli'].__file__).parents[1]}")
    print(f"{'case':<9} {'bare s':>9} {'vae s':>12} {'ratio':>7} {'target':>7}"
          "   (s per training epoch; iwae: s per pass over 2000 images)")
    for kind, tb, tv, r, t in rows:
        loss = f"   vae val loss after {args.epochs + 1} epochs {losses[kind]:.2f}" \
            if kind in losses else ""
        print(f"{kind:<9} {tb:>9.3f} {tv:>12.3f} {r:>7.3f} {t:>7.2f}"
              f"{'' if r <= t else '  MISS'}{loss}")
    return 0 if ok else 1


def report_rss() -> int:
    import resource

    print(f"maxrss_kb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")
    return 0


def memory(args) -> int:
    """Peak resident memory of one training epoch, each side in a fresh process."""
    import subprocess

    peaks = {}
    for side in ("bare", "vae"):
        out = subprocess.run([sys.executable, __file__, "--only", "mlp", "--side", side,
                              "--epochs", "0", "--n", str(args.n)], capture_output=True,
                             text=True, check=True).stdout
        peaks[side] = int(out.split("maxrss_kb")[1].split()[0]) / 1024
    ratio = peaks["vae"] / peaks["bare"]
    print(f"peak RSS MiB: bare {peaks['bare']:.0f}, vae {peaks['vae']:.0f}, ratio {ratio:.2f} "
          f"(target 1.30){'' if ratio <= 1.3 else '  MISS'}")
    return 0 if ratio <= 1.3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
