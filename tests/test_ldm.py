"""model=ldm, the latent-diffusion autoencoder: its latent is the map diffusers'
AutoencoderKL makes (same layout, same scale), the KL is diffusers' own KL summed over the
map, and a run goes out as an AutoencoderKL folder and comes back in as one's start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hostile import in_process, once

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL  # noqa: E402

from vae_cli.config.build import build_objective, planned_parameters  # noqa: E402
from vae_cli.config.schemas import validate_train  # noqa: E402
from vae_cli.errors import UserError  # noqa: E402

# 16 px greyscale shapes, two levels (f = 2): a 4 x 8 x 8 latent map, 4-group norms
TINY_LDM = ["model=ldm", "model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
            "model.norm_groups=4", "dataset.image_size=16", "loss=mse"]
CONFIG = {"in_channels": 1, "out_channels": 1, "down_block_types": ["DownEncoderBlock2D"] * 2,
          "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 16],
          "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
          "sample_size": 16}


def objective(compose, *extra: str):
    return build_objective(validate_train(compose([*TINY_LDM, *extra])), (1, 16, 16), 100)


def diffusers_twin(model) -> AutoencoderKL:
    """An AutoencoderKL holding the model's weights under diffusers' names."""
    from vae_cli.export.diffusers_format import RENAMES

    ae = AutoencoderKL(**CONFIG).eval()
    state = {}
    for name, t in model.state_dict().items():
        for ours, theirs in RENAMES:
            if name.startswith(ours):
                state[theirs + name[len(ours):]] = t
    ae.load_state_dict(state)
    return ae


def test_the_latent_is_autoencoderkls_map_and_the_kl_is_its_own(compose_cfg):
    torch.manual_seed(0)
    obj = objective(compose_cfg)
    model = obj.model.eval()
    assert model.latent_dim == 4 * 8 * 8
    ae = diffusers_twin(model)
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        q = model.posterior(x)
        theirs = ae.encode(x * 2 - 1).latent_dist  # diffusers reads [-1, 1]
        assert torch.allclose(q.mean, theirs.mean.flatten(1), atol=1e-6)
        assert torch.allclose(q.stddev, theirs.std.flatten(1), atol=1e-6)
        ours = torch.distributions.kl_divergence(q, model.prior.dist())
        assert torch.allclose(ours, theirs.kl(), rtol=1e-5)  # summed over C x h x w
        z = torch.randn(3, model.latent_dim)
        image = (ae.decode(z.view(3, 4, 8, 8)).sample + 1) / 2
        assert torch.allclose(model.decoder(z), image, atol=1e-6)


@pytest.mark.parametrize(("override", "why"), [
    ("dataset.image_size=17", "17x17 is not a multiple of it"),
    ("model.norm_groups=3", "model.norm_groups=3 must divide every width"),
    ("model.norm_groups=0", "model.norm_groups=0 must divide every width"),
    ("posterior=vq", "model=ldm keeps a Gaussian latent map"),
    ("model.ch_mult=[1,0]", "must be positive integers"),
])
def test_settings_the_architecture_cannot_take_are_one_line(compose_cfg, override, why):
    with pytest.raises(UserError, match=why):
        cfg = validate_train(compose_cfg([*TINY_LDM, override]))
        size = cfg.dataset.image_size
        build_objective(cfg, (1, size, size), 100)


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory) -> Path:
    """One epoch of the tiny model=ldm on shapes, in-process."""
    def train():
        tmp = tmp_path_factory.mktemp("ldm")
        in_process("train", *TINY_LDM, "dataset.n_train=64", "dataset.n_val=16",
                   "dataset.n_test=16", f"dataset.root={tmp / 'data'}", "trainer.epochs=1",
                   "trainer.batch_size=16", "trainer.num_images=8",
                   f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
        return tmp / "run"
    return once("ldm_run", train)


def test_export_format_diffusers_is_an_autoencoderkl_decoding_the_same_images(ldm_run,
                                                                              tmp_path):
    from vae_cli.config.build import load_trained

    out = tmp_path / "ae"
    done = in_process("export", f"ckpt={ldm_run / 'checkpoints/best.pt'}", "format=diffusers",
                      f"out_dir={out}", cwd=tmp_path)
    assert "diffusers matches vae: max |difference| 0" in done.stdout
    ae = AutoencoderKL.from_pretrained(str(out)).eval()
    assert {k: ae.config[k] for k in CONFIG} == CONFIG
    model = load_trained(str(ldm_run / "checkpoints/best.pt"), torch.device("cpu"))[0].model
    x, z = torch.rand(2, 1, 16, 16), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.decoder(z.flatten(1)), (ae.decode(z).sample + 1) / 2)
        assert torch.equal(model.posterior(x).mean, ae.encode(x * 2 - 1).latent_dist.mean
                           .flatten(1))
    assert "AutoencoderKL.from_pretrained" in (out / "README.md").read_text()
    # the latents' scale, measured: 1 / std of diffusers' own posterior samples of the
    # training images (independent noise: to within sampling error)
    from vae_cli.config.build import load_data
    from vae_cli.runtime import checkpoint

    train = load_data(checkpoint.load(ldm_run / "checkpoints/best.pt"), None,
                      torch.device("cpu")).train.float() / 255
    torch.manual_seed(5)
    with torch.no_grad():
        theirs = 1 / ae.encode(train * 2 - 1).latent_dist.sample().std()
    assert ae.config["scaling_factor"] == pytest.approx(float(theirs), rel=0.03)
    given = tmp_path / "given"
    in_process("export", f"ckpt={ldm_run / 'checkpoints/best.pt'}", "format=diffusers",
               "scaling_factor=0.5", f"out_dir={given}", cwd=tmp_path)
    assert json.loads((given / "config.json").read_text())["scaling_factor"] == 0.5


def test_another_model_is_refused_by_format_diffusers(finished_run, tmp_path):
    done = in_process("export", f"ckpt={finished_run / 'checkpoints/last.pt'}",
                      "format=diffusers", f"out_dir={tmp_path / 'x'}", cwd=tmp_path,
                      check=False)
    assert done.returncode == 2 and "exports model=ldm runs" in done.stderr


def test_training_starts_from_a_diffusers_autoencoderkl_folder(compose_cfg, tmp_path):
    torch.manual_seed(1)
    theirs = AutoencoderKL(**CONFIG)
    theirs.save_pretrained(str(tmp_path / "pretrained"))
    model = objective(compose_cfg, f"model.init_from={tmp_path / 'pretrained'}").model
    ae = diffusers_twin(model)
    mine, original = ae.state_dict(), theirs.state_dict()
    assert all(torch.equal(mine[k], original[k]) for k in original)
    wider = dict(CONFIG, block_out_channels=[8, 8])
    AutoencoderKL(**wider).save_pretrained(str(tmp_path / "other"))
    with pytest.raises(UserError, match=r"has block_out_channels=\[8, 8\]"):
        objective(compose_cfg, f"model.init_from={tmp_path / 'other'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json of a diffusers AutoencoderKL"):
        objective(compose_cfg, f"model.init_from={tmp_path / 'empty'}")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"_class_name": "x"}))
    with pytest.raises(UserError, match="cannot be loaded as a diffusers AutoencoderKL"):
        objective(compose_cfg, f"model.init_from={tmp_path / 'broken'}")
    # the count taken before allocation (on the meta device) reads no weights
    broken = validate_train(compose_cfg([*TINY_LDM, f"model.init_from={tmp_path / 'broken'}"]))
    assert planned_parameters(broken, (1, 16, 16), 100) == sum(
        p.numel() for p in objective(compose_cfg).parameters())


def test_tiles_are_decoded_at_the_tile_size_and_blended_only_at_their_seams(compose_cfg):
    from vae_cli.nets.ldm import decode_any_size, reconstruct_any_size

    torch.manual_seed(0)
    model = objective(compose_cfg).model.eval()
    dec = model.decoder
    x = torch.rand(2, 1, 16, 16)
    # an image of the training size is not tiled: the model's own reconstruction
    whole = model.likelihood.mean(reconstruct_any_size(dec, x, 16))
    assert torch.allclose(whole, model.reconstruct(x), atol=1e-6)
    # a 4 x 16 x 16 latent map (32 px) in tiles of 8 latents (16 px) overlapping by 2:
    # the first tile's unblended part is that tile decoded alone, which the whole map's
    # decoding (GroupNorm statistics and attention over all of it) is not
    z = torch.randn(1, 4, 16, 16)
    tiled = decode_any_size(dec, z, 16)
    with torch.no_grad():
        alone = (dec.decoder(dec.post_quant_conv(z[:, :, :8, :8])) + 1) / 2
        untiled = decode_any_size(dec, z, 32)
    assert tiled.shape == (1, 1, 32, 32)
    assert torch.allclose(tiled[..., :12, :12], alone[..., :12, :12], atol=1e-6)
    assert not torch.allclose(untiled[..., :12, :12], alone[..., :12, :12], atol=1e-3)
    with pytest.raises(UserError, match="multiple of 4 x 2"):
        dec.tiled(20)


def test_eval_and_sample_read_and_write_larger_images_in_tiles(ldm_run, finished_run,
                                                               tmp_path):
    from PIL import Image

    ckpt = f"ckpt={ldm_run / 'checkpoints/best.pt'}"
    in_process("eval", ckpt, "eval.image_size=32", "eval.iw_samples=0", "fd.samples=0",
               "eval.max_examples=8", "eval.disentanglement.metrics=[]",
               f"out_dir={tmp_path}", cwd=tmp_path)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert 0 < result["psnr_32px"] < 100 and 0 < result["ssim_32px"] <= 1
    in_process("sample", ckpt, "image_size=48", "num_samples=2", "pictures=false",
               f"out_dir={tmp_path}", cwd=tmp_path)
    grid = Image.open(tmp_path / "samples_48px_seed0.png")
    assert min(grid.size) >= 48
    for args, why in ((("eval", f"ckpt={finished_run / 'checkpoints/last.pt'}",
                        "eval.image_size=64"), "eval.image_size needs model=ldm"),
                      (("sample", ckpt, "image_size=33"), "not a multiple of the model's "
                                                         "factor 2"),
                      (("sample", ckpt, "image_size=32", "tile=12"), "multiple of 4 x 2")):
        done = in_process(*args, f"out_dir={tmp_path}", cwd=tmp_path, check=False)
        assert done.returncode == 2 and why in done.stderr and done.stderr.count("\n") == 1
