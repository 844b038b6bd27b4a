"""`vae export format=diffusers`: a model=ldm run as the folder
``diffusers.AutoencoderKL.from_pretrained`` loads (config.json and
diffusion_pytorch_model.safetensors), checked at export: the folder is loaded back with
diffusers and decodes the same latents to the same images as vae's decoder."""

from __future__ import annotations

from pathlib import Path

import torch

from vae_cli.errors import UserError
from vae_cli.export.weights import Exported
from vae_cli.nets.ldm import require_diffusers

# vae's module names -> AutoencoderKL's (nets/ldm.py holds diffusers' own modules)
RENAMES = (("encoder.encoder.", "encoder."), ("encoder.quant_conv.", "quant_conv."),
           ("decoder.post_quant_conv.", "post_quant_conv."), ("decoder.decoder.", "decoder."))
CHECK_BATCH = 3
SCALE_IMAGES = 1000  # training images whose latents measure the scaling factor


def exportable_config(src: Exported) -> dict:
    """The AutoencoderKL config of a model=ldm run; one line why not for any other run
    (checked before anything is measured or written)."""
    from vae_cli.nets.ldm import LDMDecoder

    decoder = src.model.decoder
    if not isinstance(decoder, LDMDecoder):
        raise UserError(f"format=diffusers exports model=ldm runs (an AutoencoderKL); this "
                        f"run is model={src.components.get('model')}: use format=safetensors")
    config = dict(decoder.config)
    if config["out_channels"] != config["in_channels"]:
        raise UserError(f"format=diffusers needs a decoder that outputs the image; "
                        f"loss={src.components.get('loss')} outputs "
                        f"{config['out_channels'] // config['in_channels']} parameters per "
                        "channel: train with loss=laplace, gaussian or mse")
    return config


def autoencoder_state(src: Exported) -> tuple[dict, dict[str, torch.Tensor]]:
    """The AutoencoderKL config and state dict of a model=ldm run."""
    config = exportable_config(src)
    state = {}
    for name, tensor in src.model.state_dict().items():
        for ours, theirs in RENAMES:
            if name.startswith(ours):
                state[theirs + name[len(ours):]] = tensor.detach().cpu()
    return config, state


@torch.no_grad()
def measured_scale(src: Exported, x: torch.Tensor, n: int = SCALE_IMAGES) -> float:
    """1 / the standard deviation of posterior samples of the first ``n`` images: the
    ``scaling_factor`` latent diffusion multiplies its latents by (Rombach et al. 2022
    measured it on a batch of their data), seeded."""
    model = src.model.eval()
    device = next(model.parameters()).device
    gen, draws = torch.Generator().manual_seed(0), []
    for i in range(0, min(n, len(x)), 100):
        xb = x[i:min(i + 100, n)].to(device).float() / 255  # uint8 images, held or streamed
        q = model.posterior(xb)
        noise = torch.randn(q.mean.shape, generator=gen).to(device)
        draws.append((q.mean + q.stddev * noise).flatten())
    return float(1 / torch.cat(draws).std())


def write_diffusers(src: Exported, out_dir: Path, scaling_factor: float
                    ) -> tuple[list[str], float]:
    """The folder's files and the largest difference, in [0, 1] pixel units, between vae's
    decoding of random latents and the reloaded AutoencoderKL's."""
    diffusers = require_diffusers()
    config, state = autoencoder_state(src)
    ae = diffusers.AutoencoderKL(**config, scaling_factor=scaling_factor)
    ae.load_state_dict(state)
    out_dir.mkdir(parents=True, exist_ok=True)
    ae.save_pretrained(str(out_dir), safe_serialization=True)
    return ["config.json", "diffusion_pytorch_model.safetensors"], agreement(src, out_dir)


@torch.no_grad()
def agreement(src: Exported, folder: Path) -> float:
    """max |vae's image - diffusers' image| over CHECK_BATCH latents drawn from N(0, I)."""
    loaded = require_diffusers().AutoencoderKL.from_pretrained(str(folder)).eval()
    model = src.model.eval()
    device = next(model.parameters()).device
    z = torch.randn(CHECK_BATCH, model.latent_dim, generator=torch.Generator().manual_seed(0))
    ours = model.decoder(z.to(device)).cpu()
    grid = model.decoder.grid
    theirs = (loaded.decode(z.view(CHECK_BATCH, *grid)).sample + 1) / 2
    return float((ours - theirs).abs().max())
