"""Builds the objects a command works with from a validated config: the objective (model,
divergence, schedule), the optimizer, and a trained model with its data from a checkpoint."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vae_cli.config.components import check_component, instantiate
from vae_cli.config.registry import check_saved, check_targets, upgrade
from vae_cli.config.schemas import validate_train
from vae_cli.data.base import Splits
from vae_cli.data.vocab import Vocab
from vae_cli.errors import UserError, one_line
from vae_cli.nets import Networks
from vae_cli.objective.bounds import Objective
from vae_cli.objective.divergences import KL
from vae_cli.objective.hierarchy import TwoLevel, TwoLevelPrior
from vae_cli.objective.model import VAE
from vae_cli.objective.posteriors import DiagonalGaussian, Posterior
from vae_cli.objective.priors import VampPrior
from vae_cli.runtime import checkpoint
from vae_cli.samplers.base import Sampler

LABELLED = ("mnist, fashion_mnist, binarized_mnist, cifar10, shapes, dsprites, or folder "
            "with one sub-folder per class")


def build_objective(cfg: DictConfig, shape: tuple[int, ...], dataset_size: int,
                    vocab_size: int | None = None, num_classes: int | None = None
                    ) -> Objective:
    """Instantiate the components and check, before any work, that they fit together.
    ``shape`` is (C, H, W) for images and (L,) for token sequences of a ``vocab_size``;
    ``num_classes`` the classes of the data's labels (None: unlabelled), which a
    conditional model reads."""
    shape = tuple(shape)
    conditional = bool(cfg.model.get("conditional", False))
    if conditional and not num_classes and len(shape) == 3:
        name = str(cfg.dataset.get("_target_", "")).rpartition(".")[2] or "this dataset"
        raise UserError(f"model.conditional=true needs class labels, and dataset={name} has "
                        f"none; use a labelled dataset ({LABELLED})")
    runtime = {"shape": shape, "latent_dim": int(cfg.model.latent_dim),
               "dataset_size": int(dataset_size), "vocab_size": vocab_size,
               "num_classes": num_classes if conditional else None}
    likelihood = instantiate("loss", cfg.loss, **runtime)
    family = instantiate("posterior", cfg.posterior, **runtime)
    nets = instantiate("model", cfg.model, out_mult=likelihood.out_mult,
                       posterior_outputs=family.outputs(runtime["latent_dim"]),
                       spatial=family.spatial, **runtime)
    if family.spatial:  # posterior=vq: z is the encoder's map [D, H, W], flattened
        runtime = spatial_latent(family, nets, runtime)
    if nets.hierarchy is not None:  # model=hvae: z = [z1, z2], p(z2) the configured prior
        family, runtime = two_level(family, nets.hierarchy, runtime)
    if len(shape) == 1 and not likelihood.tokens:
        raise UserError(f"loss={type(likelihood).__name__.lower()} scores images; token "
                        "sequences need loss=categorical")
    # A VampPrior's pseudo-inputs live where the encoder reads continuous input: pixels in
    # [0, 1], or, for a sequence encoder, unbounded embedded sequences.
    soft = {"shape": nets.soft_shape, "bounded": False} if nets.soft_shape else {}
    if nets.hierarchy is None:
        prior = instantiate("prior", cfg.prior, **{**runtime, **soft})
    else:
        top = {**runtime, "latent_dim": nets.hierarchy.top_dim}
        prior = TwoLevelPrior(instantiate("prior", cfg.prior, **top), family)
    if isinstance(prior, VampPrior) and not family.closed_form:
        raise UserError(f"prior=vamp is a mixture of posteriors q(z|u_k), whose density "
                        f"posterior={family.option} knows only at its own "
                        "samples; use posterior=gaussian with prior=vamp, or another prior")
    model = VAE(nets, family, prior, likelihood, runtime["latent_dim"])
    divergence = instantiate("divergence", cfg.divergence, **runtime)
    if family.discrete and not isinstance(divergence, KL):
        raise UserError(f"posterior={family.option} has a discrete latent, "
                        "whose KL to prior=uniform is exact: use divergence=kl")
    return Objective(model, divergence, instantiate("schedule", cfg.schedule, **runtime),
                     int(cfg.trainer.iw_samples))


def spatial_latent(family: Posterior, nets: Networks,
                   runtime: dict[str, Any]) -> dict[str, Any]:
    """A family that reads the encoder's map learns the map's grid; the latent the rest of
    the model sees is the map flattened."""
    if nets.grid is None:
        raise UserError(f"posterior={family.option} quantises the encoder's "
                        "feature map: use model=conv or model=resnet")
    family.hw = nets.grid
    return {**runtime, "latent_dim": runtime["latent_dim"] * nets.grid[0] * nets.grid[1]}


def two_level(family: Posterior, hierarchy: torch.nn.Module,
              runtime: dict[str, Any]) -> tuple[TwoLevel, dict[str, Any]]:
    """model=hvae's posterior q(z1|x, z2) q(z2|x), and the runtime arguments with the latent
    that divergences see, z = [z1, z2]."""
    if type(family) is not DiagonalGaussian:
        raise UserError(f"model=hvae has Gaussian layers; posterior="
                        f"{family.option} is not available for it, use "
                        "posterior=gaussian (its logvar bounds apply to every layer)")
    d = hierarchy.latent_dim + hierarchy.top_dim
    return TwoLevel(hierarchy, family.bounds), {**runtime, "latent_dim": d}


def optimizer_settings(cfg: DictConfig) -> dict[str, Any]:
    """The optimizer's hyperparameters from its config (betas as the tuple torch keeps)."""
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
              if k != "_target_"}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def build_optimizer(cfg: DictConfig, params: list, compiled: bool = True
                    ) -> torch.optim.Optimizer:
    """A torch.optim optimizer named by ``optim._target_`` (allow-listed to torch.optim).

    For an eager step (``compiled=False``), torch's one-kernel update where the optimizer,
    the device and this torch have one: the per-tensor loop it replaces took a quarter of a
    small MLP's eager CPU step; same maths. A compiled step fuses the loop itself."""
    node = OmegaConf.create({"_target_": cfg._target_, **optimizer_settings(cfg)})
    try:
        if not compiled:
            with contextlib.suppress(RuntimeError):  # no fused kernel for these parameters
                return instantiate("optim", node, params, fused=True)
        return instantiate("optim", node, params)
    except ValueError as e:  # torch's own range checks (momentum < 0, ...)
        raise UserError(f"optim: {e}") from None


def load_trained(path: str, device: torch.device) -> tuple[Objective, dict]:
    """Rebuild a model from a checkpoint's own config (not today's defaults), in eval mode,
    with the weights its run validated: the EMA of the weights when it kept one."""
    ckpt = checkpoint.load(path)
    saved = upgrade(ckpt["config"])
    check_saved(saved)
    cfg = validate_train(OmegaConf.create(saved))
    vocab = Vocab.from_state(ckpt.get("vocab"))
    if cfg.model.get("conditional") and not ckpt.get("num_classes"):
        raise UserError(f"{path} is a conditional model without its number of classes")
    objective = build_objective(cfg, tuple(ckpt["shape"]), ckpt.get("dataset_size", 1),
                                len(vocab) if vocab else None, ckpt.get("num_classes"))
    try:
        objective.model.load_state_dict(ckpt.get("ema") or ckpt["model"])
        objective.divergence.load_state_dict(ckpt.get("divergence") or {})
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path} does not match its own config: {one_line(e)}") from None
    return objective.to(device).eval(), ckpt


def load_data(ckpt: dict, overrides: DictConfig | None, device: torch.device) -> Splits:
    """The dataset a checkpoint was trained on (its own config, with non-null command-line
    keys such as dataset.root laid over it), on the given device. Text is encoded with the
    checkpoint's own vocabulary, never one rebuilt from the file."""
    check_saved(ckpt["config"]["dataset"], "dataset")
    node = OmegaConf.create(ckpt["config"]["dataset"])
    for key, value in (overrides or {}).items():
        if value is not None:
            node[key] = value
    check_targets(node, "dataset")
    check_component("dataset", node)
    vocab = Vocab.from_state(ckpt.get("vocab"))
    return instantiate("dataset", node, vocab=vocab.itos if vocab else None).to(device)


def build_sampler(node: DictConfig, model: VAE) -> tuple[Sampler, dict]:
    """The sampler the command line chose (sampler=prior | gmm | two_stage), on the model's
    device, and its settings as plain values (what a saved fit is matched against)."""
    check_component("sampler", node)
    sampler = instantiate("sampler", node, latent_dim=model.latent_dim, prior=model.prior)
    settings = OmegaConf.to_container(node, resolve=True)
    return sampler.to(next(model.parameters()).device), settings


def dataset_root(ckpt: dict, overrides: DictConfig | None) -> str | None:
    """Where the checkpoint's dataset lives (dataset.root, or its command-line override)."""
    root = (overrides or {}).get("root") or ckpt["config"]["dataset"].get("root")
    return root if isinstance(root, str) else None
