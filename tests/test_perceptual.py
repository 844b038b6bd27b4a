"""loss=perceptual, the latent-diffusion reconstruction loss: its terms against hand
computations (hinge and logistic losses, the adaptive weight, L1 + LPIPS per pixel), the
discriminator trained by the auxiliary step from disc_start on and nowhere else, and a run
that resumes with it bit for bit."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hostile import in_process
from test_ldm import TINY_LDM, objective

from vae_cli.errors import UserError
from vae_cli.objective.perceptual import (
    PatchDiscriminator,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
)
from vae_cli.training.step import Stepper

pytest.importorskip("lpips")

# the tiny LDM of test_ldm with a 2-layer PatchGAN (16 px -> a 2 x 2 logit map)
def gan(start: int = 0, lpips: object = None) -> list[str]:
    """The loss with a small discriminator, LPIPS with the ``lpips`` weights if given."""
    perceptual = [f"loss.lpips={lpips}"] if lpips else ["loss.perceptual_weight=0"]
    return ["loss=perceptual", *perceptual, "loss.disc_layers=2", "loss.disc_ch=8",
            f"loss.disc_start={start}", "optim.lr=1e-3"]


GAN = gan()


def test_the_discriminator_and_generator_losses_equal_their_closed_forms():
    real, fake = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([-2.0, 0.3])
    # hinge: relu(1 - real) = 0.5, 0, 2; relu(1 + fake) = 0, 1.3
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(
        0.5 * (2.5 / 3 + 1.3 / 2))
    assert generator_loss(fake, "hinge").item() == pytest.approx(0.85)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731 - softplus
    assert discriminator_loss(real, fake, "non_saturating").item() == pytest.approx(
        0.5 * ((sp(-0.5) + sp(-2.0) + sp(1.0)) / 3 + (sp(-2.0) + sp(0.3)) / 2))
    assert generator_loss(fake, "non_saturating").item() == pytest.approx(
        (sp(2.0) + sp(-0.3)) / 2)


def test_the_adaptive_weight_is_the_ratio_of_the_gradient_norms_at_the_last_layer():
    # out = W h, nll = sum |out - x|, g = -mean(a . out): both gradients by hand
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    h, x, a = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3)
    out = w @ h
    nll, g = (out - x).abs().sum(), -(a @ out).mean()
    grad_nll = torch.sign(out - x).detach() @ h.T
    grad_g = -a.unsqueeze(1) * h.sum(1).unsqueeze(0) / 5
    expected = grad_nll.norm() / (grad_g.norm() + 1e-4)
    assert adaptive_weight(nll, g, w).item() == pytest.approx(expected.item(), rel=1e-5)
    # a generator term that does not reach the layer: the clamp's 1e4, no division by 0
    flat = torch.nn.Parameter(torch.zeros(3, 4))
    assert adaptive_weight((flat @ h - x).pow(2).sum(), (flat @ h).sum() * 0, flat
                           ).item() == 1e4


def test_the_patchgan_logit_map_has_the_size_its_check_predicts():
    for size, layers in ((16, 2), (32, 3), (64, 3), (256, 3)):
        d = PatchDiscriminator(3, 8, layers)
        side = d(torch.zeros(1, 3, size, size)).shape[-1]
        assert side == PatchDiscriminator.patches(size, layers) and side > 0


def test_the_nll_is_l1_plus_lpips_at_every_pixel_in_the_latent_diffusion_units(
        compose_cfg, lpips_file):
    from vae_cli.nets.lpips import lpips_distance

    lik = objective(compose_cfg, "loss=perceptual", f"loss.lpips={lpips_file}",
                    "loss.disc_weight=0", "loss.logvar=0.5").model.likelihood
    torch.manual_seed(0)
    x, out = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    lp = lpips_distance(lik.lpips_net, out, x)
    per_pixel = 2 * (out - x).abs().flatten(1).sum(1) + 256 * lp  # [-1, 1] units
    expected = per_pixel * math.exp(-0.5) + 256 * 0.5
    assert torch.allclose(lik.nll(out, x), expected, rtol=1e-5)
    assert "lpips_net" not in "".join(lik.state_dict())  # the user's weights stay theirs
    same = lik.nll(x, x) - 256 * 0.5
    assert same.abs().max() < 1e-4  # identical images: nothing but the log-variance
    blurred = [lik.nll(F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False), x).mean()
               for k in (3, 5, 9)]
    assert blurred[0] < blurred[1] < blurred[2]


def test_a_discriminator_leaves_the_models_initial_weights_as_they_were(compose_cfg):
    weights = []
    for extra in (["loss.disc_weight=0"], ["loss.disc_weight=0.5"]):
        torch.manual_seed(3)
        model = objective(compose_cfg, *GAN, *extra).model
        weights.append({k: v for k, v in model.state_dict().items()
                        if not k.startswith("likelihood.")})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_discriminator_trains_only_in_its_own_step_and_only_from_disc_start(
        compose_cfg):
    obj = objective(compose_cfg, *gan(2))
    lik = obj.model.likelihood
    disc = lik.discriminator
    assert obj.auxiliaries() == [lik]
    own = {id(p) for p in disc.parameters()}
    assert not own & {id(p) for p in obj.main_parameters()}
    opt = torch.optim.Adam(obj.main_parameters(), 1e-3)
    step = Stepper(obj, obj, opt, torch.device("cpu"), aux_opts=[lik.auxiliary_optimizer()])
    x = torch.rand(8, 1, 16, 16).round()

    def weights():
        return [p.detach().clone() for p in disc.parameters()]

    before = weights()
    for i in range(2):  # before disc_start: no adversarial term, D untouched
        terms = step(x, i)
        assert terms["g_loss"] == 0 and terms["d_weight"] == 0 and terms["d_loss"] == 0
        assert all(torch.equal(a, b) for a, b in zip(before, weights(), strict=True))
    terms = step(x, 2)
    assert terms["d_loss"] > 0 and terms["d_weight"] > 0 and terms["g_loss"] != 0
    assert not all(torch.equal(a, b) for a, b in zip(before, weights(), strict=True))
    assert all(not p.requires_grad for p in disc.parameters())  # frozen again after it
    # the loss counts the generator term at its adaptive weight; validation does not
    obj.eval()
    with torch.no_grad():
        val, _ = obj(x)
    assert "g_loss" not in val and val["loss"].item() == pytest.approx(
        (val["recon"] + val["div"] * 1.0).item(), rel=1e-6)


def test_accumulated_steps_report_update_terms_as_their_mean_per_update(compose_cfg):
    # grad_norm and d_loss come from updates only; with accumulate=2 the epoch mean of
    # the reported column equals the mean over updates (it crashed before: one column more)
    obj = objective(compose_cfg, *GAN)
    lik = obj.model.likelihood
    opt = torch.optim.Adam(obj.main_parameters(), 1e-3)
    step = Stepper(obj, obj, opt, torch.device("cpu"), aux_opts=[lik.auxiliary_optimizer()],
                   grad_clip=10.0)
    x = torch.rand(8, 1, 16, 16).round()
    first = step(x, 0, scale=0.5, update=False)
    second = step(x, 0, scale=0.5, update=True)
    assert list(first) == list(second) and list(first)[-2:] == ["grad_norm", "d_loss"]
    assert first["grad_norm"] == 0 and first["d_loss"] == 0
    assert second["grad_norm"] > 0 and second["d_loss"] > 0


@pytest.mark.parametrize("override, why", [
    ("trainer.iw_samples=4", "not a log-density"),
    ("loss.disc_layers=4", "16 x 16 are too small for a 4-layer PatchGAN"),
    ("loss.pixel=l3", "loss.pixel='l3' is not one of"),
    ("loss.disc_loss=wgan", "is not one of"),
])
def test_settings_the_loss_cannot_take_are_one_line(compose_cfg, override, why):
    with pytest.raises(UserError, match=why) as e:
        objective(compose_cfg, *GAN, override)
    assert "\n" not in str(e.value)


def test_lpips_weights_are_needed_only_for_the_perceptual_term(compose_cfg, tmp_path):
    lik = objective(compose_cfg, "loss=perceptual", f"loss.lpips={tmp_path / 'none.pt'}",
                    "loss.disc_weight=0").model.likelihood  # a reader of the model needs none
    with pytest.raises(UserError, match="do not exist"):
        lik.ready()
    with pytest.raises(UserError, match="needs loss.lpips"):
        objective(compose_cfg, "loss=perceptual", "loss.lpips=null", "loss.disc_weight=0")
    assert objective(compose_cfg, *GAN, "loss.lpips=null").model.likelihood.lpips_net is None


def _train(tmp, name, *extra, lpips=None):
    in_process("train", *TINY_LDM, *gan(3, lpips), "dataset.n_train=64",
               "dataset.n_val=16", "dataset.n_test=16", f"dataset.root={tmp / 'data'}",
               "trainer.batch_size=16", "trainer.pictures=false",
               f"hydra.run.dir={tmp / name}", *extra, cwd=tmp)
    return tmp / name


def test_a_run_whose_lpips_weights_are_gone_still_samples_and_exports(tmp_path,
                                                                      lpips_file):
    import shutil

    weights = tmp_path / "lpips.pt"
    missing = in_process("train", *TINY_LDM, *gan(3, weights), f"hydra.run.dir={tmp_path}/no",
                         cwd=tmp_path, check=False)  # training stops before any step
    assert missing.returncode == 2 and "do not exist" in missing.stderr
    assert missing.stderr.count("\n") == 1 and not (tmp_path / "no/checkpoints").exists()
    shutil.copy(lpips_file, weights)
    run = _train(tmp_path, "run", "trainer.epochs=1", lpips=weights)
    weights.unlink()
    ckpt = f"ckpt={run / 'checkpoints/last.pt'}"
    in_process("sample", ckpt, "num_samples=2", "pictures=false", cwd=tmp_path)
    in_process("export", ckpt, "format=diffusers", f"out_dir={tmp_path / 'ae'}", cwd=tmp_path)
    assert (tmp_path / "ae" / "config.json").is_file()


def test_a_run_with_the_discriminator_resumes_bit_for_bit(tmp_path):
    full = _train(tmp_path, "full", "trainer.epochs=2")
    half = _train(tmp_path, "half", "trainer.epochs=1")
    in_process("train", f"ckpt={half / 'checkpoints/last.pt'}", "trainer.epochs=2",
               cwd=tmp_path)
    a, b = (torch.load(r / "checkpoints/last.pt", weights_only=True) for r in (full, half))
    assert len(a["aux_optim"]) == 1 and a["aux_optim"][0]["state"]  # D's Adam moments
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert any(k.startswith("likelihood.discriminator") for k in a["model"])
    assert (full / "metrics.csv").read_text() == (half / "metrics.csv").read_text()
    header = (full / "metrics.csv").read_text().splitlines()[0]
    assert all(c in header for c in ("g_loss", "d_weight", "d_loss"))
    # vae eval: image scores, and no bound in nats for a loss that is no density
    in_process("eval", f"ckpt={full / 'checkpoints/last.pt'}", "fd.samples=0",
               "eval.disentanglement.metrics=[mig]", cwd=tmp_path)
    result = json.loads((full / "eval.json").read_text())
    assert "psnr" in result and "nelbo" not in result and "nll_iwae" not in result
