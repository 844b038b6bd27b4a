"""Builds the objects a command works with from a validated config: the objective (model,
divergence, schedule), the optimizer, and a trained model with its data from a checkpoint."""

from __future__ import annotations

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
from vae_cli.objective import rules
from vae_cli.objective.bounds import Objective
from vae_cli.objective.hierarchy import TwoLevel, TwoLevelPrior
from vae_cli.objective.model import VAE
from vae_cli.objective.posteriors import Posterior
from vae_cli.objective.rules import Design
from vae_cli.objective.topdown import Layered, LayeredPrior
from vae_cli.runtime import checkpoint
from vae_cli.samplers.base import Sampler


def planned_parameters(*args: Any) -> int | None:
    """The parameter count of ``build_objective(*args)``, from a build on the meta device
    (no memory taken, no random draws), so that a bound is checked before a model larger
    than the machine is allocated; None where a component cannot be built there."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in build_objective(*args).parameters())
    except UserError:
        raise
    except Exception:  # a component that reads its tensors' values while it is built
        return None


def build_objective(cfg: DictConfig, shape: tuple[int, ...], dataset_size: int,
                    vocab_size: int | None = None, num_classes: int | None = None
                    ) -> Objective:
    """Instantiate the components, have rules.py judge the combination before any work,
    then compose them. ``shape`` is (C, H, W) for images and (L,) for token sequences of a
    ``vocab_size``; ``num_classes`` the classes of the data's labels (None: unlabelled),
    which a conditional model reads."""
    shape = tuple(shape)
    conditional = bool(cfg.model.get("conditional", False))
    runtime = {"shape": shape, "latent_dim": int(cfg.model.latent_dim),
               "dataset_size": int(dataset_size), "vocab_size": vocab_size,
               "num_classes": num_classes if conditional else None}
    likelihood = instantiate("loss", cfg.loss, **runtime)
    family = instantiate("posterior", cfg.posterior, **runtime)
    nets = instantiate("model", cfg.model, out_mult=likelihood.out_mult,
                       posterior_outputs=family.outputs(runtime["latent_dim"]),
                       spatial=family.spatial, **runtime)
    prior = instantiate("prior", cfg.prior, **prior_arguments(family, nets, runtime))
    runtime = {**runtime, "latent_dim": latent_dim(family, nets, runtime["latent_dim"])}
    divergence = instantiate("divergence", cfg.divergence, **runtime)
    schedule = instantiate("schedule", cfg.schedule, **runtime)
    dataset = str((cfg.get("dataset") or {}).get("_target_", "")).rpartition(".")[2]
    rules.check(Design(family, prior, divergence, schedule, likelihood, nets, shape,
                       conditional, num_classes, dataset or "this dataset",
                       int(cfg.trainer.iw_samples)))
    if family.spatial:  # posterior=vq: z is the encoder's map [D, H, W], flattened
        family.hw = nets.grid
    if nets.hierarchy is not None:  # model=hvae: z = [z1, z2], p(z2) the configured prior
        family = TwoLevel(nets.hierarchy, family.bounds)
        prior = TwoLevelPrior(prior, family)
    if nets.topdown is not None:  # model=vdvae: p(z) is the decoder's top-down layers
        family = Layered(nets.topdown, family.bounds)
        prior = LayeredPrior(family)
    model = VAE(nets, family, prior, likelihood, runtime["latent_dim"])
    return Objective(model, divergence, schedule, int(cfg.trainer.iw_samples))


def latent_dim(family: Posterior, nets: Networks, width: int) -> int:
    """The size of z that divergences and schedules see: a latent map (posterior=vq's codes,
    model=ldm's Gaussian map) flattened [D x H x W]; model=hvae's z = [z1, z2];
    model=vdvae's every layer's map, flattened."""
    if nets.grid is not None:
        return width * nets.grid[0] * nets.grid[1]
    if nets.hierarchy is not None:
        return nets.hierarchy.latent_dim + nets.hierarchy.top_dim
    if nets.topdown is not None:
        return nets.topdown.latent_dim
    return width


def prior_arguments(family: Posterior, nets: Networks, runtime: dict[str, Any]
                    ) -> dict[str, Any]:
    """The configured prior's arguments: over z (model=hvae: over its top layer z2). A
    VampPrior's pseudo-inputs live where the encoder reads continuous input: pixels in
    [0, 1], or, for a sequence encoder, unbounded embedded sequences."""
    if nets.hierarchy is not None:
        return {**runtime, "latent_dim": nets.hierarchy.top_dim}
    soft = {"shape": nets.soft_shape, "bounded": False} if nets.soft_shape else {}
    return {**runtime, "latent_dim": latent_dim(family, nets, runtime["latent_dim"]), **soft}


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
    args = (cfg, tuple(ckpt["shape"]), ckpt.get("dataset_size", 1),
            len(vocab) if vocab else None, ckpt.get("num_classes"))
    weights = ckpt.get("ema") or ckpt["model"]
    # a config that asks for more parameters than the file holds values cannot match it:
    # refused before that model is allocated (a doctored config can ask for terabytes)
    held = sum(v.numel() for v in [*weights.values(), *(ckpt.get("divergence") or {}).values()]
               if isinstance(v, torch.Tensor))
    planned = planned_parameters(*args)
    if planned is not None and planned > held:
        raise UserError(f"{path} does not match its own config: the config's model has "
                        f"{planned:,} parameters, the file holds {held:,} values")
    objective = build_objective(*args)
    try:
        objective.model.load_state_dict(weights)
        objective.divergence.load_state_dict(ckpt.get("divergence") or {})
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path} does not match its own config: "
                        f"{one_line(e, chain=True)}") from None
    bad = next((k for k, v in weights.items() if v.is_floating_point()
                and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"{path} holds non-finite weights ({bad}); a model of NaN or inf "
                        "cannot be scored, sampled or exported: use an earlier checkpoint")
    return objective.to(device).eval(), ckpt


# The dataset keys that say where the data is or how it is read, not what it is: a reader
# may change them (a streamed split holds the same pixels as the in-memory one).
WHERE = ("root", "download", "path", "val_path", "test_path", "urls", "stream", "workers",
         "prefetch")


def load_data(ckpt: dict, overrides: DictConfig | None, device: torch.device,
              image_size: int | None = None) -> Splits:
    """The dataset a checkpoint was trained on (its own config, with non-null command-line
    keys such as dataset.root laid over it), on the given device; read at another
    ``image_size`` when given (a model that reads any size). Text is encoded with the
    checkpoint's own vocabulary, never one rebuilt from the file."""
    check_saved(ckpt["config"]["dataset"], "dataset")
    node = OmegaConf.create(ckpt["config"]["dataset"])
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in WHERE and value != node.get(key):
            raise UserError(f"dataset.{key}={value} differs from the checkpoint's "
                            f"({node.get(key)}): a model is scored on data prepared as it was "
                            "trained on; only where the data is (dataset.root, dataset.path) "
                            "may change")
        node[key] = value
    if image_size is not None:
        if "image_size" not in node:
            raise UserError(f"dataset={str(node.get('_target_')).rpartition('.')[2]} has one "
                            "size: it cannot be read at another image_size")
        node["image_size"] = image_size
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
