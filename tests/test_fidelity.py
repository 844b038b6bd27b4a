"""PSNR and SSIM of reconstructions, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from vae_cli.evaluation.fidelity import gaussian_window, psnr, ssim


def test_psnr_is_ten_log10_of_one_over_the_mse():
    a = torch.rand(2, 3, 8, 8) * 0.8
    assert psnr(a, a + 0.1).tolist() == pytest.approx([20.0, 20.0])  # MSE 0.01
    b = a.clone()
    b[1, 0, 0, 0] += 0.5  # one pixel of 192 off by 0.5: MSE 0.25 / 192
    assert psnr(a, b)[1].item() == pytest.approx(10 * math.log10(192 / 0.25))
    assert psnr(a, a)[0].item() == math.inf


def test_ssim_of_flat_images_is_the_luminance_term_and_one_for_identical_images():
    """For constant images u and v the variances and covariance vanish: SSIM =
    (2uv + C1) / (u^2 + v^2 + C1)."""
    u, v = 0.3, 0.7
    a, b = torch.full((1, 1, 16, 16), u), torch.full((1, 1, 16, 16), v)
    c1 = 0.01**2
    assert ssim(a, b).item() == pytest.approx((2 * u * v + c1) / (u * u + v * v + c1))
    x = torch.rand(2, 3, 24, 24)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0])


def test_ssim_falls_as_a_blur_grows_and_the_window_is_a_normalised_gaussian():
    w = gaussian_window()
    assert w.shape == (11, 11) and w.sum().item() == pytest.approx(1.0)
    assert w[5, 5] == w.max() and torch.allclose(w, w.T)
    torch.manual_seed(0)
    x = torch.rand(1, 1, 32, 32)
    scores = []
    for k in (1, 3, 5, 9):  # box blurs of growing size
        blurred = torch.nn.functional.avg_pool2d(x, k, stride=1, padding=k // 2,
                                                 count_include_pad=False)
        scores.append(ssim(x, blurred).item())
    assert scores[0] == pytest.approx(1.0) and scores == sorted(scores, reverse=True)
    assert scores[-1] < 0.5


def test_lpips_of_identical_images_is_zero_and_grows_with_a_blur(lpips_file):
    from vae_cli.nets.lpips import lpips_distance, lpips_network

    net = lpips_network(str(lpips_file))
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    assert lpips_distance(net, x, x).tolist() == [0.0, 0.0]
    grey = torch.rand(2, 1, 32, 32)  # grey images are compared as RGB
    assert lpips_distance(net, grey, grey).shape == (2,)
    d = [lpips_distance(net, x, torch.nn.functional.avg_pool2d(
        x, k, stride=1, padding=k // 2, count_include_pad=False)).mean().item()
         for k in (3, 5, 9)]
    assert 0 < d[0] < d[1] < d[2]


def test_lpips_weights_that_are_not_an_lpips_state_dict_are_one_line(tmp_path, lpips_file):
    from vae_cli.errors import UserError
    from vae_cli.nets.lpips import lpips_network

    with pytest.raises(UserError, match="do not exist"):
        lpips_network(str(tmp_path / "none.pt"))
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"other\.pt is not an LPIPS\(VGG\) state dict"):
        lpips_network(str(tmp_path / "other.pt"))


def test_vae_eval_reports_psnr_ssim_and_lpips_of_the_reconstructions(finished_run, tmp_path,
                                                                    lpips_file):
    import json

    from hostile import in_process

    in_process("eval", f"ckpt={finished_run / 'checkpoints/last.pt'}", "eval.iw_samples=0",
               "fd.samples=32", "fd.epochs=1", "eval.disentanglement.metrics=[mig]",
               f"eval.lpips={lpips_file}", f"out_dir={tmp_path}", cwd=tmp_path)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert 0 < result["psnr"] < 100 and 0 < result["ssim"] < 1 and result["lpips"] > 0
    # the reconstructions' distance (rFID's form) beside the samples', on the same features
    assert result["rfd_shapes_features"] > 0 and result["fd_shapes_features"] > 0


def test_pytorch_fids_inception_is_loaded_from_a_users_file_through_its_own_loader(
        tmp_path):
    """A weights file of pytorch-fid's FID Inception (here with untrained weights, written
    from pytorch-fid's own architecture) is what fd.model=pytorch_fid reads: the features
    are 2048-d pool3 activations, and a foreign file is one line."""
    inception = pytest.importorskip("pytorch_fid.inception")
    from vae_cli.errors import UserError
    from vae_cli.evaluation.features import pytorch_fid_extractor

    # the architecture of pytorch-fid's fid_inception_v3, from its own parts (no download)
    net = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = inception.FIDInceptionE_1(1280)
    net.Mixed_7c = inception.FIDInceptionE_2(2048)
    torch.save(net.state_dict(), tmp_path / "fid.pth")
    features = pytorch_fid_extractor(str(tmp_path / "fid.pth"), torch.device("cpu"))
    x = torch.rand(3, 1, 32, 32)
    f = features.features(x)
    assert f.shape == (3, 2048) and features.key == "fd_inception_features"
    assert torch.equal(f, features.features(x))  # eval mode: deterministic
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="is not pytorch-fid's FID Inception"):
        pytorch_fid_extractor(str(tmp_path / "other.pth"), torch.device("cpu"))
