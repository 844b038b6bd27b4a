"""`vae export`: safetensors loads back bit for bit through the card's own snippet; the
model card says what the files hold; bad input is one line and exit code 2.

One real `vae train` gives the run; a text model is that checkpoint with another model
config and random weights (what is compared does not need training). The command runs
in-process, and once through the real CLI."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
import torch
from hostile import tiny_run
from omegaconf import OmegaConf
from test_cli import vae

from vae_cli.commands import export as export_command
from vae_cli.commands.main import one_line
from vae_cli.config.build import build_objective, load_trained
from vae_cli.config.schemas import validate_train
from vae_cli.runtime import checkpoint

pytest.importorskip("safetensors")

EVAL = {"split": "test", "examples": 64, "epoch": 1, "loss": 171.234567, "nelbo": 171.234567,
        "nll_iwae": 168.765432, "active_units": 2, "kl_per_dim": [0.1, 0.2, 0.0, 0.0]}
TEXT = ["dataset=sentences", "model=rnn", "loss=categorical", "model.embed_dim=8",
        "model.hidden=16", "model.latent_dim=3", "trainer.device=cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tiny_run(tmp_path_factory.mktemp("export"))
    EVAL["checkpoint"] = str(run / "checkpoints/best.pt")
    (run / "eval.json").write_text(json.dumps(EVAL))
    return run


def export(compose, ckpt: Path, *args: str) -> Path:
    return export_command.run(compose([f"ckpt={ckpt}", *args], name="export"))


def variant(compose, run: Path, dst: Path, overrides: list[str], vocab=None,
            shape=None) -> Path:
    """The trained checkpoint with another model config and random weights (jittered, so
    that zero-initialised layers take part in the comparison too)."""
    ckpt = torch.load(run / "checkpoints/best.pt", weights_only=True)
    cfg = validate_train(compose(overrides))
    shape = shape or ckpt["shape"]
    objective = build_objective(cfg, tuple(shape), 256,
                                len(vocab["itos"]) if vocab else None)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in objective.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = OmegaConf.to_container(cfg, resolve=True)
    config["ckpt"] = None
    dst.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(dst, {"config": config, "shape": list(shape), "dataset_size": 256,
                          "vocab": vocab, "model": objective.model.state_dict(),
                          "divergence": objective.divergence.state_dict(),
                          "state": ckpt["state"]})
    return dst


def snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def same_outputs(a, b) -> bool:
    """Bit for bit: posterior parameters and decoder outputs on the same inputs."""
    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16) if not a.autoregressive else torch.randint(4, 9, (4, 6))
    z = torch.randn(4, a.latent_dim)
    with torch.no_grad():
        qa, qb = a.posterior(x), b.posterior(x)
        outs = [(qa.mean, qb.mean), (qa.stddev, qb.stddev)]
        if a.autoregressive:
            outs.append((a.decode(z, x), b.decode(z, x)))
        else:
            outs.append((a.decode(z), b.decode(z)))
    return all(torch.equal(p, q) for p, q in outs)


def load_with_the_card(folder: Path, monkeypatch):
    """Runs the model card's own Python snippet in the export folder; returns its model."""
    monkeypatch.chdir(folder)
    scope: dict = {}
    exec(snippet((folder / "README.md").read_text()), scope)  # noqa: S102 - our own card
    return scope["model"]


def test_safetensors_round_trip_is_bit_exact(run, compose_cfg_module, monkeypatch):
    out = export(compose_cfg_module, run / "checkpoints/best.pt")
    assert out == run / "export/safetensors"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    original = load_trained(str(run / "checkpoints/best.pt"), torch.device("cpu"))[0].model
    loaded = load_with_the_card(out, monkeypatch)
    assert same_outputs(loaded, original)
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in
               loaded.state_dict().items())
    info = json.loads((out / "config.json").read_text())
    assert info["shape"] == [1, 16, 16] and info["latent_dim"] == 4
    assert info["components"]["model"] == "mlp" and info["vocab"] is None
    assert info["parameters"] == sum(p.numel() for p in original.parameters())
    with torch.no_grad():  # the comparison sees a change of one weight
        loaded.decoder[-2].weight[0, 0] += 1e-6
    assert not same_outputs(loaded, original)


def test_text_model_stores_its_tied_embedding_once(run, compose_cfg_module, tmp_path,
                                                        monkeypatch):
    vocab = {"itos": ["<pad>", "<unk>", "<bos>", "<eos>", "a", "cat", "sat", "the", "dog"],
             "tokens": "word"}
    ckpt = variant(compose_cfg_module, run, tmp_path / "text/checkpoints/last.pt", TEXT,
                   vocab=vocab, shape=[6])
    out = export(compose_cfg_module, ckpt, f"out_dir={tmp_path / 'text-st'}")
    from safetensors.torch import load_file

    stored = load_file(out / "model.safetensors")
    assert "encoder.embed.weight" in stored and "decoder.embed.weight" not in stored
    loaded = load_with_the_card(out, monkeypatch)
    assert loaded.encoder.embed.weight is loaded.decoder.embed.weight
    assert same_outputs(loaded, load_trained(str(ckpt), torch.device("cpu"))[0].model)
    assert "vocab.decode" in (out / "README.md").read_text()


def test_model_card_holds_the_runs_metrics(run, compose_cfg_module, tmp_path):
    card = (export(compose_cfg_module, run / "checkpoints/best.pt",
                   f"out_dir={tmp_path / 'card'}") / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vae-cli\n")
    with (run / "metrics.csv").open() as f:
        final = list(csv.DictReader(f))[-1]
    for key, value in final.items():
        if key != "epoch":
            assert f"| {key} | {value} |" in card, key
    assert "| nll_iwae | 168.765 |" in card and "| active_units | 2 |" in card
    for fact in ("| model | `mlp`", "| prior | `normal`", "| divergence | `kl`, beta 1.0",
                 "| loss | `bernoulli`", "| latent dim | 4 |", "`model.safetensors`",
                 "hidden:\n  - 64"):
        assert fact in card, fact
    # A later epoch in metrics.csv: the checkpoint's own epoch is shown beside the final one.
    later = tmp_path / "later"
    (later / "checkpoints").mkdir(parents=True)
    (later / "checkpoints/best.pt").write_bytes((run / "checkpoints/best.pt").read_bytes())
    text = (run / "metrics.csv").read_text()
    (later / "metrics.csv").write_text(text + text.splitlines()[1].replace("1,", "2,", 1)
                                       .replace(final["val_loss"], "99.5") + "\n")
    card = (export(compose_cfg_module, later / "checkpoints/best.pt") / "README.md").read_text()
    assert "| epoch 1 (this checkpoint) | epoch 2 (final) |" in card
    assert f"| val_loss | {final['val_loss']} | 99.5 |" in card


def test_existing_files_are_replaced_and_others_kept(run, compose_cfg_module, tmp_path):
    out = tmp_path / "hub"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text("an old card")
    export(compose_cfg_module, run / "checkpoints/best.pt", f"out_dir={out}")
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "README.md").read_text().startswith("---")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                     "model.safetensors", "notes.txt"]


BAD = [
    ([], "no checkpoint given"),
    (["ckpt=MISSING"], "does not exist"),
    (["ckpt=GARBAGE"], "is not a readable vae checkpoint"),
    (["ckpt=RUN", "format=zip"], "format='zip' is not one of safetensors"),
    (["ckpt=RUN", "out_dir=AFILE"], "out_dir="),
    (["ckpt=RUN", "out_dir=AFILE/sub"], "cannot be written"),
    (["ckpt=RUN", "device=tpu"], "device='tpu'"),
    (["ckpt=RUN", "formatt=onnx"], "formatt"),
]


@pytest.mark.parametrize("args, fragment", BAD)
def test_bad_input_is_one_line(run, compose_cfg_module, tmp_path, args, fragment):
    (tmp_path / "GARBAGE").write_bytes(os.urandom(256))
    (tmp_path / "AFILE").write_text("a file, not a folder")
    names = {"MISSING": tmp_path / "missing.pt", "GARBAGE": tmp_path / "GARBAGE",
             "RUN": run / "checkpoints/best.pt", "AFILE": tmp_path / "AFILE"}
    args = [re.sub("|".join(names), lambda m: str(names[m.group(0)]), a) for a in args]
    with pytest.raises(Exception) as e:
        export_command.run(compose_cfg_module(args, name="export"))
    message = one_line(e.value)
    assert fragment in message and "\n" not in message
    assert getattr(e.value, "exit_code", 2) == 2


def test_the_real_command(run, tmp_path):
    out = vae("export", f"ckpt={run / 'checkpoints/last.pt'}", f"out_dir={tmp_path / 'cli'}",
              cwd=tmp_path)
    assert out.stdout.startswith("wrote ") and not out.stderr.strip(), out.stderr
    assert (tmp_path / "cli/model.safetensors").is_file()
