"""`vae export`: safetensors loads back bit for bit through the card's own snippet; ONNX
graphs agree with the PyTorch model under onnxruntime at another batch size; io.json and
the model card say what the files hold; bad input is one line and exit code 2.

One real `vae train` gives the run; other architectures are that checkpoint with another
model config and random weights (what is compared does not need training). The command
runs in-process, and once through the real CLI (the mlp's ONNX export)."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from cards import load_with_the_card, snippet
from hostile import copy_run
from omegaconf import OmegaConf
from test_cli import DATA, vae

from vae_cli.commands import export as export_command
from vae_cli.commands.main import one_line
from vae_cli.config.build import build_objective, load_trained
from vae_cli.config.schemas import validate_train
from vae_cli.errors import UserError
from vae_cli.objective.posteriors import mean_of
from vae_cli.runtime import checkpoint

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("safetensors")

EVAL = {"split": "test", "examples": 64, "epoch": 1, "loss": 171.234567, "nelbo": 171.234567,
        "nll_iwae": 168.765432, "active_units": 2, "kl_per_dim": [0.1, 0.2, 0.0, 0.0]}
ARCHS = {  # tiny networks, one per image architecture, each with another likelihood
    "mlp": None,  # the trained run itself (bernoulli)
    "conv": [*DATA, "model=conv", "model.channels=4", "model.fc_hidden=16", "loss=categorical",
             "loss.classes=4"],
    "resnet": [*DATA, "model=resnet", "model.channels=4", "model.latent_dim=3", "loss=logistic"],
}
TEXT = ["dataset=sentences", "model=rnn", "loss=categorical", "model.embed_dim=8",
        "model.hidden=16", "model.latent_dim=3", "trainer.device=cpu"]
MAX_DIFF: dict[str, float] = {}  # printed at the end (pytest -s): the report's numbers


@pytest.fixture(scope="module")
def run(tmp_path_factory, finished_run) -> Path:
    run = copy_run(finished_run, tmp_path_factory.mktemp("export") / "run")
    EVAL["checkpoint"] = str(run / "checkpoints/best.pt")
    (run / "eval.json").write_text(json.dumps(EVAL))
    return run


@pytest.fixture(scope="module")
def mlp_onnx(run) -> Path:
    """The real command, once: `vae export ckpt=... format=onnx` into <run>/export/onnx."""
    proc = vae("export", f"ckpt={run / 'checkpoints/best.pt'}", "format=onnx", cwd=run.parent)
    lines = proc.stdout.strip().splitlines()  # the check's result and the files, nothing else
    assert len(lines) == 2 and lines[0].startswith("onnxruntime matches PyTorch"), proc.stdout
    assert lines[1].startswith("wrote ") and not proc.stderr.strip(), proc.stderr
    return run / "export/onnx"


def export(compose, ckpt: Path, *args: str) -> Path:
    return export_command.run(compose([f"ckpt={ckpt}", *args], name="export"))


def variant(compose, run: Path, dst: Path, overrides: list[str], vocab=None,
            shape=None, num_classes=None) -> Path:
    """The trained checkpoint with another model config and random weights (jittered, so
    that zero-initialised layers take part in the comparison too)."""
    ckpt = torch.load(run / "checkpoints/best.pt", weights_only=True)
    cfg = validate_train(compose(overrides))
    shape = shape or ckpt["shape"]
    objective = build_objective(cfg, tuple(shape), 256,
                                len(vocab["itos"]) if vocab else None, num_classes)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in objective.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = OmegaConf.to_container(cfg, resolve=True)
    config["ckpt"] = None
    if shape == ckpt["shape"]:  # the run's own examples, so the run's own dataset node
        config["dataset"] = ckpt["config"]["dataset"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(dst, {"config": config, "shape": list(shape), "dataset_size": 256,
                          "vocab": vocab, "num_classes": num_classes,
                          "model": objective.model.state_dict(),
                          "divergence": objective.divergence.state_dict(),
                          "state": ckpt["state"]})
    return dst


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


def test_text_model_ties_its_embedding_and_refuses_onnx(run, compose_cfg_module, tmp_path,
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
    with pytest.raises(UserError) as e:
        export(compose_cfg_module, ckpt, "format=onnx", f"out_dir={tmp_path / 'text-onnx'}")
    assert str(e.value) == ("format=onnx does not support sequence models yet; use "
                            "format=safetensors")
    assert not (tmp_path / "text-onnx").exists()


def test_conditional_model_loads_with_its_classes_and_refuses_onnx(run, compose_cfg_module,
                                                                    tmp_path, monkeypatch):
    ckpt = variant(compose_cfg_module, run, tmp_path / "cond/checkpoints/last.pt",
                   ["model.conditional=true", "model.hidden=[16]", "model.latent_dim=3"],
                   num_classes=4)
    out = export(compose_cfg_module, ckpt, f"out_dir={tmp_path / 'cond-st'}")
    loaded = load_with_the_card(out, monkeypatch)  # the card's snippet decodes under y too
    original = load_trained(str(ckpt), torch.device("cpu"))[0].model
    z, y = torch.randn(8, 3), torch.arange(8) % 4
    assert loaded.num_classes == 4 and torch.equal(loaded.generate(z, y=y),
                                                   original.generate(z, y=y))
    with pytest.raises(UserError, match="does not support conditional models"):
        export(compose_cfg_module, ckpt, "format=onnx", f"out_dir={tmp_path / 'cond-onnx'}")


def test_flow_posterior_model_loads_with_its_flow_and_refuses_onnx(run, compose_cfg_module,
                                                                    tmp_path, monkeypatch):
    ckpt = variant(compose_cfg_module, run, tmp_path / "iaf/checkpoints/last.pt",
                   ["posterior=iaf", "model.hidden=[16]", "model.latent_dim=3"])
    out = export(compose_cfg_module, ckpt, f"out_dir={tmp_path / 'iaf-st'}")
    loaded = load_with_the_card(out, monkeypatch)
    original = load_trained(str(ckpt), torch.device("cpu"))[0].model
    x = torch.rand(4, *original_shape(ckpt))
    torch.testing.assert_close(mean_of(loaded.posterior(x)), mean_of(original.posterior(x)))
    with pytest.raises(UserError, match="format=onnx exports Gaussian posteriors only"):
        export(compose_cfg_module, ckpt, "format=onnx", f"out_dir={tmp_path / 'iaf-onnx'}")


def original_shape(ckpt: Path) -> tuple[int, ...]:
    return tuple(torch.load(ckpt, weights_only=True)["shape"])


def _run_onnx(folder: Path, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for name, inputs in (("encoder", {"x": x}), ("decoder", {"z": z})):
        graph = onnxruntime.InferenceSession(str(folder / f"{name}.onnx"),
                                             providers=["CPUExecutionProvider"])
        assert graph.get_inputs()[0].shape[0] == "batch"  # symbolic: any size
        names = [o.name for o in graph.get_outputs()]
        assert all(o.shape[0] == "batch" for o in graph.get_outputs())
        feed = {k: v.numpy() for k, v in inputs.items()}
        out.update({n: torch.from_numpy(a) for n, a in zip(names, graph.run(None, feed),
                                                           strict=True)})
    return out


def _max_diff(model, folder: Path, batch: int) -> float:
    """The largest |onnxruntime - PyTorch| over mu, logvar, params and mean, where PyTorch
    is the model's own posterior, decoder and likelihood (not the export's wrappers)."""
    torch.manual_seed(batch)
    shape = json.loads((folder / "io.json").read_text())["shape"]
    x, z = torch.rand(batch, *shape), torch.randn(batch, model.latent_dim)
    got = _run_onnx(folder, x, z)
    with torch.no_grad():
        q = model.posterior(x)
        params = model.decode(z)
        want = {"mu": q.mean, "logvar": 2 * q.stddev.log(), "params": params,
                "mean": model.likelihood.mean(params)}
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape)
                                                            for k, v in want.items()}
    return max(float((got[k] - want[k]).abs().max()) for k in want)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_onnx_agrees_with_pytorch_at_any_batch_size(run, compose_cfg_module, mlp_onnx, tmp_path,
                                                    arch):
    ckpt, out = run / "checkpoints/best.pt", mlp_onnx
    if ARCHS[arch]:
        ckpt = variant(compose_cfg_module, run, tmp_path / f"{arch}/checkpoints/best.pt",
                       ARCHS[arch])
        out = export(compose_cfg_module, ckpt, "format=onnx", f"out_dir={tmp_path / 'onnx'}")
    model = load_trained(str(ckpt), torch.device("cpu"))[0].model
    diffs = [_max_diff(model, out, batch) for batch in (5, 1)]  # traced at 2, checked at 3
    MAX_DIFF[arch] = max(diffs)
    assert max(diffs) < 1e-4, diffs
    io = json.loads((out / "io.json").read_text())
    assert [t["name"] for t in io["encoder"]["inputs"] + io["encoder"]["outputs"]] == \
           ["x", "mu", "logvar"]
    assert [t["name"] for t in io["decoder"]["inputs"] + io["decoder"]["outputs"]] == \
           ["z", "params", "mean"]
    assert io["decoder"]["inputs"][0]["shape"] == ["batch", model.latent_dim]
    assert io["encoder"]["inputs"][0]["shape"] == ["batch", *io["shape"]]
    assert {t["dtype"] for g in ("encoder", "decoder") for k in ("inputs", "outputs")
            for t in io[g][k]} == {"float32"}
    assert io["config"] == torch.load(ckpt, weights_only=True)["config"]
    assert io["components"]["model"] == arch and max(io["check"]["max_abs_diff"].values()) < 1e-4
    with torch.no_grad():  # the comparison sees a change of one weight
        next(model.decoder.parameters()).view(-1)[0] += 0.1
    assert _max_diff(model, out, 5) > 1e-4
    print(f"\nmax |onnxruntime - torch| {arch}: {MAX_DIFF[arch]:.3g}")


def test_onnx_card_snippet_runs(mlp_onnx, monkeypatch):
    out = mlp_onnx
    assert {p.name for p in out.iterdir()} == {"encoder.onnx", "decoder.onnx", "io.json",
                                               "README.md"}
    assert "| `encoder.onnx` | x -> mu, logvar: the encoder q(z\\|x) |" in (
        out / "README.md").read_text()  # a | in a table cell is escaped
    monkeypatch.chdir(out)
    scope: dict = {}
    exec(snippet((out / "README.md").read_text()), scope)  # noqa: S102 - our own card
    assert scope["samples"].shape == (8, 1, 16, 16) and scope["mu"].shape == (8, 4)
    assert 0 <= scope["samples"].min() and scope["samples"].max() <= 1


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
    (["ckpt=RUN", "format=zip"], "format='zip' is not one of safetensors, onnx"),
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


def test_missing_onnx_extra_is_named(run, compose_cfg_module, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    with pytest.raises(UserError, match=r"needs onnxruntime: pip install 'vae-cli\[onnx\]'"):
        export(compose_cfg_module, run / "checkpoints/best.pt", "format=onnx",
               f"out_dir={tmp_path / 'x'}")
    assert not (tmp_path / "x").exists()
