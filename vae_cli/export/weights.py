"""`vae export`'s files: what a trained model is (shared by every format), and the
safetensors format (the weights of any model, text models included).

ONNX graphs are in ``onnx_graphs.py`` and the model card in ``card.py``. Every file is
written atomically; files of the folder that are not the export's own are left alone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from vae_cli.errors import UserError
from vae_cli.objective.model import VAE
from vae_cli.runtime.files import atomic_write, write_text

FORMAT = "vae_cli.export/1"


@dataclasses.dataclass
class Exported:
    """A trained model and what describes it, as the writers need them."""

    model: VAE
    config: dict[str, Any]  # the checkpoint's own config, plain and resolved
    components: dict[str, str]  # group -> option name: {"model": "mlp", ...}
    shape: list[int]  # one example: (C, H, W), or (L,) token ids
    dataset_size: int
    vocab: dict[str, Any] | None  # a text model's vocabulary, as checkpoints store it
    checkpoint: Path
    epoch: int | None
    rows: list[dict[str, Any]]  # the metrics rows the checkpoint carries

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())  # tied weights counted once

    @property
    def sequence(self) -> bool:
        return bool(self.model.autoregressive)


def describe(src: Exported) -> dict[str, Any]:
    """What config.json (and io.json) says about the model: enough to rebuild it."""
    return {"format": FORMAT, "components": src.components, "shape": list(src.shape),
            "dataset_size": src.dataset_size, "latent_dim": src.model.latent_dim,
            "parameters": src.parameters, "vocab": src.vocab,
            "num_classes": src.model.num_classes or None, "config": src.config}


def write_json(path: Path, content: dict[str, Any]) -> Path:
    return write_text(path, json.dumps(content, indent=2) + "\n")


def plain_tensors(model: VAE) -> dict[str, torch.Tensor]:
    """The state dict as safetensors stores it: contiguous CPU copies that share no memory.
    A tensor tied to another (a text model's embedding, read by encoder and decoder) is
    kept once, under its first name; safetensors.torch.load_model ties it back on load."""
    seen: set[tuple] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype,
                tuple(t.shape), t.stride())
        if t.numel() and view in seen:
            continue
        seen.add(view)
        out[name] = t.detach().to("cpu", copy=True).contiguous()
    return out


def require_safetensors() -> None:
    """safetensors is a dependency of vae-cli; an install made without dependencies still
    gets one line rather than a traceback."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        raise UserError("format=safetensors needs the safetensors package: "
                        "pip install 'safetensors>=0.4'") from None


def write_safetensors(src: Exported, out_dir: Path) -> dict[str, str]:
    """model.safetensors and config.json; returns {file name: what it holds}."""
    from safetensors.torch import save

    data = save(plain_tensors(src.model), metadata={"format": "pt"})
    with atomic_write(out_dir / "model.safetensors") as f:
        f.write(data)
    write_json(out_dir / "config.json", describe(src))
    return {"model.safetensors": "the model's weights (encoder, decoder, prior, likelihood): "
                                 "its state dict, tied tensors stored once",
            "config.json": "the training config, example shape, dataset size and "
                           "vocabulary: what rebuilds the model around the weights"}
