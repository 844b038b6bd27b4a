"""What a sequence model writes instead of pictures: sampled, reconstructed and
interpolated lines, as text files (and printed by `vae sample`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vae_cli.data.vocab import Vocab
from vae_cli.evaluation.diagnostics import encode_all
from vae_cli.objective.model import VAE
from vae_cli.reports.plots import plot_scatter
from vae_cli.runtime.files import write_text

log = logging.getLogger(__name__)


def lines(vocab: Vocab, ids: torch.Tensor) -> list[str]:
    return [vocab.decode(row) for row in ids.cpu()]


@torch.no_grad()
def samples(model: VAE, vocab: Vocab, z: torch.Tensor, temperature: float) -> list[str]:
    return lines(vocab, model.generate(z, temperature))


@torch.no_grad()
def homotopy(model: VAE, x: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Token ids decoded greedily along the line from each x[2i] to x[2i+1] in latent
    space (Bowman et al. 2016, section 5): [pairs * steps, L], pair by pair."""
    z = model.interpolate(x[0::2], x[1::2], steps)
    return model.generate(z.reshape(-1, z.shape[-1]))


def reconstruction_lines(model: VAE, vocab: Vocab, x: torch.Tensor) -> list[str]:
    """Each line ("> ") above the greedy decode of its posterior mean ("= ")."""
    pairs = zip(lines(vocab, x), lines(vocab, model.reconstruct(x)), strict=True)
    return [f"> {a}\n= {b}" for a, b in pairs]


def sample_text(model: VAE, vocab: Vocab, z: torch.Tensor, temperature: float) -> str:
    """Greedy decodes of the prior draws z, then samples at the given temperature."""
    greedy = samples(model, vocab, z, 0.0)
    parts = ["# greedy", *greedy]
    if temperature > 0:
        parts += ["", f"# temperature {temperature:g}", *samples(model, vocab, z, temperature)]
    return "\n".join(parts) + "\n"


@torch.no_grad()
def write_text_pictures(model: VAE, data, split: str, out_dir: Path, count: int = 16,
                        pairs: int = 4, batch_size: int = 256,
                        max_points: int = 5000) -> list[Path]:
    """reconstructions.txt (each line, then its greedy decode from the posterior mean),
    interpolations.txt (homotopies between pairs of lines) and the latent scatter."""
    model.eval()
    out_dir, vocab, x = Path(out_dir), data.vocab, data.split(split)
    text = "\n\n".join(reconstruction_lines(model, vocab, x[:count])) + "\n"
    written = [write_text(out_dir / "reconstructions.txt", text)]
    n, steps = min(pairs, len(x) // 2), 7
    if n:  # a split of one line has no pair to interpolate between
        ends = lines(vocab, x[: 2 * n])
        paths = lines(vocab, homotopy(model, x[: 2 * n], steps))  # every pair in one decode
        blocks = []
        for i in range(n):
            middle = (f"  {s}" for s in paths[i * steps:(i + 1) * steps])
            blocks.append("\n".join([f"> {ends[2 * i]}", *middle, f"> {ends[2 * i + 1]}"]))
        written.append(write_text(out_dir / "interpolations.txt",
                                  "\n\n".join(blocks) + "\n"))
    mu = encode_all(model, x[:max_points], batch_size)[0]
    written.append(plot_scatter(mu, None, "", out_dir / "latent_scatter.png"))
    return written


@torch.no_grad()
def epoch_text(model: VAE, vocab: Vocab, x: torch.Tensor, z: torch.Tensor, path: Path) -> Path:
    """Per-epoch view of a text model: greedy decodes of prior draws and reconstructions."""
    drawn = samples(model, vocab, z, 0.0)
    text = "\n".join(["# samples (greedy)", *drawn, "", "# reconstructions",
                      *reconstruction_lines(model, vocab, x)]) + "\n"
    write_text(path, text)
    log.info("samples: %s", " | ".join(drawn[:3]))
    return path
