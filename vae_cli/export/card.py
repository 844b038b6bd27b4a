"""The model card of an export (its README.md, with the front matter Hugging Face reads):
what the model is, its final metrics, the files, how to load them, and the config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vae_cli.export.weights import Exported
from vae_cli.runtime.files import write_text
from vae_cli.runtime.run_folder import RunFileError, RunFolder, read_eval, read_metrics

log = logging.getLogger(__name__)


def rows_shown(run_dir: Path, src: Exported) -> tuple[str, list[dict[str, Any]]]:
    """The run's metrics.csv rows (values as written), else the rows the checkpoint carries
    (a checkpoint copied away from its run folder); with where they came from."""
    try:
        rows = read_metrics(RunFolder(run_dir).metrics)
    except RunFileError as e:
        log.warning("%s; the checkpoint's rows are shown", e)
        return "the checkpoint (no readable metrics.csv beside it)", src.rows
    if rows:
        return "`metrics.csv`", rows
    return "the checkpoint (no metrics.csv beside it)", src.rows


def eval_shown(run_dir: Path) -> dict[str, Any] | None:
    try:
        return read_eval(RunFolder(run_dir).eval_json())
    except RunFileError as e:
        log.warning("%s; the card leaves it out", e)
        return None


def cell(text: str) -> str:
    """Text inside a Markdown table cell: a bare | would end the cell (q(z|x))."""
    return text.replace("|", "\\|")


def _number(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def metrics_section(src: Exported, run_dir: Path) -> list[str]:
    """The final row of the run's metrics, beside the checkpoint's own epoch when that is
    an earlier one (best.pt), then eval.json's numbers."""
    where, rows = rows_shown(run_dir, src)
    out = ["## Metrics", ""]
    if rows:
        final = rows[-1]
        own = next((r for r in rows if str(r.get("epoch")) == str(src.epoch)), None)
        columns = [(f"epoch {final.get('epoch')} (final, this checkpoint)", final)]
        if own is not None and own is not final:
            columns = [(f"epoch {own.get('epoch')} (this checkpoint)", own),
                       (f"epoch {final.get('epoch')} (final)", final)]
        out += [f"From {where}, in nats per example (`val_*` on the validation split):", "",
                "| metric | " + " | ".join(c for c, _ in columns) + " |",
                "|---" * (len(columns) + 1) + "|"]
        out += [f"| {k} | " + " | ".join(_number(r.get(k, "")) for _, r in columns) + " |"
                for k in final if k != "epoch"]
    else:
        out.append("No training metrics were found.")
    result = eval_shown(run_dir)
    if result:
        scalars = {k: v for k, v in result.items() if k not in ("epoch", "examples")
                   and isinstance(v, int | float) and not isinstance(v, bool)}
        out += ["", f"From `eval.json` (`vae eval`: split {result.get('split')}, "
                    f"{result.get('examples')} examples, checkpoint "
                    f"`{Path(str(result.get('checkpoint'))).name}` at epoch "
                    f"{result.get('epoch')}):", "", "| metric | value |", "|---|---|"]
        out += [f"| {k} | {_number(v)} |" for k, v in scalars.items()]
    return out


def summary(src: Exported) -> list[str]:
    c, cfg = src.components, src.config
    shape = " x ".join(str(n) for n in src.shape)
    data = (f"token sequences of length {shape}, vocabulary of {len(src.vocab['itos'])}"
            if src.vocab else f"examples of {shape}")
    beta = cfg.get("divergence", {}).get("beta")
    return ["| | |", "|---|---|",
            f"| dataset | `{c.get('dataset')}`: {data} ({src.dataset_size} training examples) |",
            f"| model | `{c.get('model')}`: encoder q(z\\|x) and decoder p(x\\|z) |",
            f"| prior | `{c.get('prior')}`: p(z) |",
            f"| divergence | `{c.get('divergence')}`" + (f", beta {beta}" if beta is not None
                                                         else "") + " |",
            f"| loss | `{c.get('loss')}`: -log p(x\\|z) |",
            f"| latent dim | {src.model.latent_dim} |",
            f"| parameters | {src.parameters:,} |",
            f"| checkpoint | `{src.checkpoint.name}`, epoch {src.epoch} |"]


SAFETENSORS_SNIPPET = '''import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model

from vae_cli.config.build import build_objective
from vae_cli.config.schemas import validate_train

folder = Path(".")  # this folder, e.g. huggingface_hub.snapshot_download("<user>/<repo>")
info = json.loads((folder / "config.json").read_text())
cfg = validate_train(OmegaConf.create(info["config"]))
vocab_size = len(info["vocab"]["itos"]) if info["vocab"] else None
model = build_objective(cfg, tuple(info["shape"]), info["dataset_size"], vocab_size,
                        info.get("num_classes")).model
load_model(model, folder / "model.safetensors")  # also ties shared tensors back
model.eval()
# a conditional model (num_classes set) decodes each draw under the class y asked for
y = torch.arange(16) % model.num_classes if model.conditional else None
x = model.generate(model.prior.sample(16), y=y)  # 16 samples: __WHAT__'''

ONNX_SNIPPET = '''from pathlib import Path

import numpy as np
import onnxruntime as ort

folder = Path(".")  # this folder, e.g. huggingface_hub.snapshot_download("<user>/<repo>")
encoder = ort.InferenceSession(str(folder / "encoder.onnx"))
decoder = ort.InferenceSession(str(folder / "decoder.onnx"))
x = np.random.rand(8, __SHAPE__).astype(np.float32)  # 8 examples, values in [0, 1]
mu, logvar = encoder.run(["mu", "logvar"], {"x": x})
params, mean = decoder.run(["params", "mean"], {"z": mu})  # mean: the reconstructions
z = np.random.randn(8, __LATENT__).astype(np.float32)  # __PRIOR__
samples = decoder.run(["mean"], {"z": z})[0]  # 8 images in [0, 1]'''


DIFFUSERS_SNIPPET = '''import torch
from diffusers import AutoencoderKL

vae = AutoencoderKL.from_pretrained(".")  # this folder, or its hub repository
x = torch.rand(4, __SHAPE__) * 2 - 1  # images scaled to [-1, 1], as every diffusers VAE reads
z = vae.encode(x).latent_dist.sample()  # [4, __GRID__]
images = (vae.decode(z).sample + 1) / 2  # back to [0, 1]'''


def load_section(src: Exported, fmt: str) -> list[str]:
    if fmt == "diffusers":
        grid = ", ".join(str(n) for n in src.model.decoder.grid)
        code = (DIFFUSERS_SNIPPET.replace("__SHAPE__", ", ".join(str(n) for n in src.shape))
                .replace("__GRID__", grid))
        return ["## How to load", "", "With diffusers alone (`pip install diffusers`): an "
                "AutoencoderKL, as the latent-diffusion pipelines load theirs:", "",
                "```python", code, "```"]
    if fmt == "onnx":
        prior = ("samples of the prior N(0, I)" if src.components.get("prior") == "normal"
                 else "N(0, I) codes; the learned prior itself is in format=safetensors")
        code = (ONNX_SNIPPET.replace("__SHAPE__", ", ".join(str(n) for n in src.shape))
                .replace("__LATENT__", str(src.model.latent_dim)).replace("__PRIOR__", prior))
        intro = ("With onnxruntime alone (`pip install onnxruntime numpy`); io.json names "
                 "every input and output and what `params` means for this likelihood:")
    else:
        what = "token ids [16, L]" if src.sequence else "images in [0, 1]"
        code = SAFETENSORS_SNIPPET.replace("__WHAT__", what)
        if src.sequence:
            code += ('\nfrom vae_cli.data.vocab import Vocab\n\nvocab = Vocab.from_state('
                     'info["vocab"])\nprint("\\n".join(vocab.decode(row) for row in x))')
        intro = ("With vae's own builder (`pip install vae-cli`): the config rebuilds the "
                 "networks, safetensors fills in the weights:")
    return ["## How to load", "", intro, "", "```python", code, "```"]


def model_card(src: Exported, fmt: str, files: dict[str, str], run_dir: Path,
               notes: list[str] = ()) -> str:
    c = src.components
    lines = ["---", "library_name: vae-cli", "tags:", "- vae", "- variational-autoencoder",
             "- pytorch", f"- {fmt}", f"- {c.get('dataset')}", "---", "",
             f"# {c.get('model')} VAE on {c.get('dataset')}", "",
             "A variational autoencoder trained with `vae` (the vae-cli package): an encoder "
             "q(z|x), a decoder p(x|z) and a prior p(z), trained on",
             "loss(x) = recon(x) + beta * divergence(q(z|x), p(z)).", "", *summary(src), "",
             *metrics_section(src, run_dir), "", "## Files", "", "| file | what |", "|---|---|",
             *[f"| `{name}` | {cell(what)} |" for name, what in
               {**files, "README.md": "this model card"}.items()], "", *notes,
             *load_section(src, fmt), "", "## Config", "",
             "The run's config as the checkpoint stores it (`vae train` reads the same keys):",
             "", "```yaml", OmegaConf.to_yaml(OmegaConf.create(src.config)).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_card(src: Exported, fmt: str, files: dict[str, str], run_dir: Path,
               out_dir: Path, notes: list[str] = ()) -> Path:
    return write_text(out_dir / "README.md", model_card(src, fmt, files, run_dir, notes))
