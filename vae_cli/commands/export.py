"""`vae export ckpt=... format=safetensors|onnx|diffusers`: the model as files another
program loads, with a model card (README.md), in a folder `huggingface_hub.upload_folder`
takes as it is (pushing it is the user's step). Default folder: <run>/export/<format>/."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from vae_cli.config.build import load_trained
from vae_cli.config.registry import option_names, upgrade
from vae_cli.config.schemas import check_out_dir, validate_export
from vae_cli.export.card import write_card
from vae_cli.export.weights import Exported, require_safetensors, write_safetensors
from vae_cli.runtime.device import resolve_device
from vae_cli.runtime.run_folder import RunFolder


def diffusers_files(src: Exported, cfg: DictConfig, ckpt: dict, out_dir: Path
                    ) -> tuple[dict[str, str], list[str]]:
    """format=diffusers: the folder, with the scaling factor given or measured on the
    checkpoint's training data; the card's note on its check."""
    from vae_cli.config.build import load_data
    from vae_cli.export.diffusers_format import (
        CHECK_BATCH,
        SCALE_IMAGES,
        exportable_config,
        measured_scale,
        write_diffusers,
    )

    exportable_config(src)  # before the data is read and measured
    scale, source = cfg.scaling_factor, "given at export"
    if scale is None:
        data = load_data(ckpt, cfg.dataset, torch.device("cpu"))
        scale = measured_scale(src, data.train)
        source = (f"1 / the standard deviation of posterior samples of the first "
                  f"{SCALE_IMAGES} training images, as latent diffusion measured its own")
    names, diff = write_diffusers(src, out_dir, float(scale))
    print(f"diffusers matches vae: max |difference| {diff:.2g}; scaling_factor {scale:.5g}")
    return {name: "" for name in names}, [
        f"Checked at export: diffusers.AutoencoderKL.from_pretrained of this folder decodes "
        f"{CHECK_BATCH} latents drawn from N(0, I) to vae's images, max |difference| "
        f"{diff:.2g} (pixels in [0, 1]). It reads and writes images in [-1, 1], as every "
        f"diffusers VAE does. scaling_factor {scale:.5g}: {source}.", ""]


def run(cfg: DictConfig) -> Path:
    cfg = validate_export(cfg)
    if cfg.format == "onnx":
        from vae_cli.export.onnx_graphs import require_onnx

        require_onnx()  # before the checkpoint is read: a missing extra is known at once
    elif cfg.format == "diffusers":
        from vae_cli.export.diffusers_format import require_diffusers

        require_diffusers()
    else:
        require_safetensors()
    objective, ckpt = load_trained(cfg.ckpt, resolve_device(cfg.device))
    run = RunFolder.of_checkpoint(cfg.ckpt)
    run_dir = run.path
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run.export(cfg.format)
    check_out_dir(str(out_dir))
    config = upgrade(ckpt["config"])
    state = ckpt.get("state") or {}
    src = Exported(model=objective.model, config=config, components=option_names(config),
                   shape=list(ckpt["shape"]), dataset_size=ckpt.get("dataset_size", 1),
                   vocab=ckpt.get("vocab"), checkpoint=Path(cfg.ckpt), epoch=state.get("epoch"),
                   rows=list(state.get("rows", [])))
    notes: list[str] = []
    if cfg.format == "onnx":
        from vae_cli.export.onnx_graphs import CHECK_BATCH, write_onnx

        files, diffs = write_onnx(src, out_dir)
        checked = ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())
        notes = [f"Checked at export: onnxruntime and PyTorch on a batch of {CHECK_BATCH} "
                 f"(the graphs were traced with another size), max |difference| {checked}.",
                 ""]
        print(f"onnxruntime matches PyTorch: max |difference| {checked}")
    elif cfg.format == "diffusers":
        files, notes = diffusers_files(src, cfg, ckpt, out_dir)
    else:
        files = write_safetensors(src, out_dir)
    card = write_card(src, cfg.format, files, run_dir, out_dir, notes)
    print("wrote " + ", ".join(str(out_dir / name) for name in files) + f", {card}")
    return out_dir
