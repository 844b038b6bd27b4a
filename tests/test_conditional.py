"""Conditional VAEs (Sohn et al. 2015): the label reaches encoder and decoder as a one-hot,
every prior and divergence trains with it, and the commands pass it wherever x goes."""

from __future__ import annotations

import math
import signal

import pytest
import torch
from hostile import one_line_failure
from test_cli import DATA, rows, vae
from torchvision.io import read_image, write_png

from vae_cli.commands import eval as eval_command
from vae_cli.commands import sample as sample_command
from vae_cli.config.build import build_objective
from vae_cli.config.schemas import validate_train
from vae_cli.data.folder import folder
from vae_cli.errors import UserError
from vae_cli.nets import conv, mlp, resnet
from vae_cli.objective.bounds import Objective, log_weights
from vae_cli.objective.divergences import KL
from vae_cli.objective.likelihoods import Bernoulli
from vae_cli.objective.model import VAE
from vae_cli.objective.posteriors import DiagonalGaussian
from vae_cli.objective.priors import NormalPrior, VampPrior
from vae_cli.runtime import checkpoint
from vae_cli.training.recipe import fit, setup
from vae_cli.training.signals import Interrupted

CLASSES = 3  # shapes: square, ellipse, heart
SMALL = [*DATA, "model.hidden=[32]", "model.latent_dim=3", "model.conditional=true",
         "trainer.epochs=1"]


def _model(builder, shape=(1, 16, 16), prior=None, **kw) -> VAE:
    nets = builder.build(latent_dim=4, conditional=True, shape=shape, num_classes=CLASSES, **kw)
    return VAE(nets, DiagonalGaussian(), prior or NormalPrior(latent_dim=4), Bernoulli(), 4)


NETS = [(mlp, {"hidden": [16]}), (conv, {"channels": 4, "fc_hidden": 8}),
        (resnet, {"channels": 4})]


@pytest.mark.parametrize("builder, kw", NETS, ids=["mlp", "conv", "resnet"])
def test_encoder_and_decoder_read_a_one_hot_label_and_depend_on_it(builder, kw):
    torch.manual_seed(0)
    model = _model(builder, **kw)
    seen = []
    for net in (model.encoder, model.decoder):
        net.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    x, z = torch.rand(4, 1, 16, 16), torch.randn(4, 4)
    y, other = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2])
    mu = model.posterior(x, y).mean
    out = model.decode(z, y=y)
    for c in seen:  # what reached both networks: the one-hot rows of y
        assert c.dtype == torch.float32 and torch.equal(c, torch.eye(CLASSES)[y])
    assert not torch.allclose(model.posterior(x, other).mean, mu)
    assert not torch.allclose(model.decode(z, y=other), out)
    assert torch.equal(model.decode(z, y=y), out)  # the label alone changed the output


def test_labels_go_only_to_a_model_built_for_them():
    model = _model(mlp, hidden=[8])
    with pytest.raises(ValueError, match="needs the class labels"):
        model.posterior(torch.rand(2, 1, 16, 16))
    plain = VAE(mlp.build(latent_dim=4, hidden=[8], shape=(1, 16, 16)),
                DiagonalGaussian(), NormalPrior(latent_dim=4), Bernoulli(), 4)
    assert not plain.conditional and isinstance(plain.encoder, torch.nn.Sequential)
    with pytest.raises(ValueError, match="unconditional"):
        plain.posterior(torch.rand(2, 1, 16, 16), torch.tensor([0, 1]))


def test_k_importance_samples_are_decoded_under_their_own_example_label():
    torch.manual_seed(0)
    objective = Objective(_model(mlp, hidden=[16]), KL(), iw_samples=3)
    model = objective.model
    x, y = torch.rand(5, 1, 16, 16).round(), torch.tensor([0, 1, 2, 1, 0])
    torch.manual_seed(1)
    lw = log_weights(model, x, 3, y=y)
    torch.manual_seed(1)
    z = model.rsample(model.posterior(x, y), 3)
    for s in range(3):
        torch.testing.assert_close(lw.px[s], model.log_px(z[s], x, y))
    terms, _ = objective(x, y=y)
    assert torch.isfinite(terms["loss"])


def test_vamp_pseudo_inputs_carry_learned_soft_labels():
    prior = VampPrior(components=5, latent_dim=4, shape=(1, 16, 16), num_classes=CLASSES)
    model = _model(mlp, prior=prior, hidden=[16])
    labels = prior.soft_labels()
    assert labels.shape == (5, CLASSES)
    torch.testing.assert_close(labels.sum(1), torch.ones(5))
    assert labels.argmax(1).tolist() == [0, 1, 2, 0, 1]  # pseudo-input k starts as k mod C
    model.prior.log_prob(torch.randn(7, 4)).sum().backward()
    assert prior.label_logits.grad.abs().sum() > 0  # the labels learn with the pixels
    unconditional = VampPrior(components=5, latent_dim=4, shape=(1, 16, 16))
    assert "label_logits" not in unconditional.state_dict()


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    g = torch.Generator().manual_seed(0)
    for name in ("cat", "dog/nested"):
        (root / "classes" / name).mkdir(parents=True)
        for i in range(5):
            write_png(torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8, generator=g),
                      str(root / "classes" / name / f"{i}.png"))
    return root


def test_a_folder_labels_its_images_by_sub_folder(labelled_folder):
    d = folder(path=str(labelled_folder / "classes"), root=str(labelled_folder / "cache"),
               channels=1, image_size=8, val_fraction=0.2, test_fraction=0.2)
    assert d.num_classes == 2
    assert all(d.labels[s] is not None and len(d.labels[s]) == len(d.split(s))
               for s in ("train", "val", "test"))
    assert sorted(torch.cat(list(d.labels.values())).tolist()) == [0] * 5 + [1] * 5
    write_png(torch.zeros(1, 8, 8, dtype=torch.uint8),
              str(labelled_folder / "classes" / "top.png"))
    flat = folder(path=str(labelled_folder / "classes"), cache=False, channels=1, image_size=8)
    assert flat.num_classes is None  # an image outside every sub-folder: no classes


@pytest.mark.parametrize("dataset", ["celeba", "folder"])
def test_an_unlabelled_dataset_is_refused(compose_cfg, dataset):
    cfg = validate_train(compose_cfg([f"dataset={dataset}", "model.conditional=true"]))
    with pytest.raises(UserError, match=f"dataset={dataset} has none"):
        build_objective(cfg, (3, 32, 32), 100, num_classes=None)


def test_a_text_model_is_refused(compose_cfg):
    cfg = validate_train(compose_cfg(["dataset=sentences", "model=rnn", "loss=categorical",
                                      "model.conditional=true"]))
    with pytest.raises(UserError, match="model=rnn has no conditional form"):
        build_objective(cfg, (12,), 100, vocab_size=20)


def _train(compose_cfg, tmp_path, name, *extra):
    cfg = validate_train(compose_cfg([*SMALL, f"dataset.root={tmp_path / 'data'}", *extra]))
    fit(setup(cfg, tmp_path / name))
    return tmp_path / name


VAMP = ["prior=vamp", "prior.components=4"]


@pytest.mark.parametrize("extra", [
    [], VAMP, [*VAMP, "divergence=mmd"],
    ["divergence=adversarial", "divergence.critic_steps=1", "divergence.hidden=16"],
    ["trainer.iw_samples=2"],
], ids=["normal-kl", "vamp-kl", "vamp-mmd", "adversarial", "iwae"])
def test_conditional_training_with_each_prior_and_divergence(compose_cfg, tmp_path, extra):
    run = _train(compose_cfg, tmp_path, "run", *extra)
    row = rows(run)[-1]
    assert all(math.isfinite(float(row[k])) for k in ("train_loss", "val_loss"))
    saved = checkpoint.load(run / "checkpoints/last.pt")
    assert saved["num_classes"] == CLASSES
    # the end-of-training grid: one row per class (16 images: 6 draws per row), 16 px + pads
    grid = read_image(str(run / "images/samples_001.png"))
    assert grid.shape[1:] == (CLASSES * 18 + 2, 6 * 18 + 2)


@pytest.fixture(scope="module")
def trained(compose_cfg_module, tmp_path_factory):
    return _train(compose_cfg_module, tmp_path_factory.mktemp("cond"), "run")


def test_sample_draws_one_class_or_one_row_per_class(compose_cfg, trained):
    ckpt = f"ckpt={trained / 'checkpoints/last.pt'}"
    sample_command.run(compose_cfg([ckpt, "label=2", "num_samples=5", "seed=1",
                                    "pictures=false"], name="sample"))
    saved = torch.load(trained / "samples_seed1.pt", weights_only=True)
    assert saved["images"].shape[0] == 5 and saved["labels"].tolist() == [2] * 5
    sample_command.run(compose_cfg([ckpt, "num_samples=6", "seed=2"], name="sample"))
    saved = torch.load(trained / "samples_seed2.pt", weights_only=True)
    assert saved["labels"].tolist() == [0, 0, 1, 1, 2, 2] and len(saved["z"]) == 2
    # each column is one z decoded under every class
    assert not torch.equal(saved["images"][0], saved["images"][2])
    assert (trained / "reconstructions.png").is_file()
    with pytest.raises(UserError, match="out of range"):
        sample_command.run(compose_cfg([ckpt, "label=3"], name="sample"))


def test_a_fitted_sampler_draws_for_a_conditional_model(compose_cfg, trained):
    # the codes are encoded given each example's label; the draws decode like prior ones
    ckpt = f"ckpt={trained / 'checkpoints/last.pt'}"
    sample_command.run(compose_cfg([ckpt, "sampler=gmm", "sampler.components=2", "label=1",
                                    "num_samples=4", "fd.samples=16", "pictures=false"],
                                   name="sample"))
    saved = torch.load(trained / "samples_gmm_seed0.pt", weights_only=True)
    assert saved["images"].shape[0] == 4 and saved["labels"].tolist() == [1] * 4
    assert (trained / "samplers/gmm_last.pt").is_file()
    assert (trained / "samples_gmm_seed0.json").is_file()


def test_eval_bounds_the_likelihood_given_the_label(compose_cfg, trained):
    result = eval_command.run(compose_cfg([f"ckpt={trained / 'checkpoints/last.pt'}",
                                           "eval.iw_samples=4", "eval.max_examples=20"],
                                          name="eval"))
    assert result["likelihood"].startswith("log p(x|y)") and result["examples"] == 20
    assert result["nll_iwae"] <= result["nelbo_iw"]


def test_resume_mid_epoch_equals_an_uninterrupted_run(compose_cfg, tmp_path):
    args = ["trainer.epochs=2", "trainer.log_every=1"]
    full = _train(compose_cfg, tmp_path, "full", *args)
    cfg = validate_train(compose_cfg([*SMALL, f"dataset.root={tmp_path / 'data'}", *args]))
    run = setup(cfg, tmp_path / "cut")
    # SIGTERM in the middle of epoch 2: the run saves its place in the permutation
    run.stepper.hooks.on_log.append(
        lambda step, _: signal.raise_signal(signal.SIGTERM) if step == 11 else None)
    with pytest.raises(Interrupted):
        fit(run)
    path = tmp_path / "cut/checkpoints/last.pt"
    ckpt = checkpoint.load(path)
    assert ckpt["state"]["progress"]["batch"] == 3
    fit(setup(cfg, tmp_path / "cut", ckpt, path))
    assert (full / "metrics.csv").read_bytes() == (tmp_path / "cut/metrics.csv").read_bytes()
    a = torch.load(full / "checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(path, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_real_command_refuses_a_label_out_of_range(trained):
    proc = vae("sample", f"ckpt={trained / 'checkpoints/last.pt'}", "label=7",
               cwd=trained.parent, check=False)
    one_line_failure(proc, "label=7 is out of range")
