"""The typed part of each command's config, and its validation: once, at the command line.

Every command's config is checked here before any work: the fixed schemas below (trainer,
eval, sample, export settings) by OmegaConf against their dataclasses, the component groups
(dataset, model, ..., optim) against their builders' signatures. What comes out is typed;
nothing downstream re-checks it. An impossible value stops with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from vae_cli.config import limits
from vae_cli.config.components import check_component, instantiate
from vae_cli.config.registry import COMPONENTS, check_targets
from vae_cli.errors import UserError, one_line
from vae_cli.runtime.files import unwritable
from vae_cli.runtime.run_folder import RunFolder


@dataclasses.dataclass
class TrainerConfig:
    epochs: int = 40
    batch_size: int = 128
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; log-densities stay fp32)
    patience: int | None = None  # epochs without val improvement before stopping
    max_minutes: float | None = None  # wall-clock budget of one invocation (resumable)
    resume: Any = False  # true: continue hydra.run.dir's last.pt | auto: if there is one
    log_every: int = 50  # steps between progress-bar refreshes (each one syncs)
    image_every: int = 1  # epochs between reconstruction/sample grids
    num_images: int = 64
    pictures: bool = True  # false: no picture grids and no final picture set
    accumulate: int = 1  # batches whose gradients one optimizer step sums
    iw_samples: int = 1  # > 1 trains on the IWAE bound (KL-family divergences only)
    detect_anomaly: bool = False  # torch.autograd anomaly mode: names the op that made NaN
    compile: bool = False  # torch.compile the training step (model forward and optimizer)
    cuda_graph: bool = False  # the graph-safe step, captured into a CUDA graph on CUDA
    grad_clip: float | None = None  # max total gradient norm (after fp16 unscaling)
    skip_threshold: float | None = None  # skip updates whose gradient norm exceeds this
    skip_limit: int = 100  # that many skipped updates in a row stop the run
    ema: float | None = None  # decay of an exponential moving average of the weights
    bucket: bool = False  # token data: batches of lines of similar length (less padding)


# the disentanglement metrics `vae eval` can run (evaluation/disentanglement/suite.py)
DISENTANGLEMENT_METRICS = ("beta_vae", "factor_vae", "mig", "sap", "dci", "modularity")


@dataclasses.dataclass
class BetaVAEScoreConfig:
    batch_size: int = 64
    train_points: int = 1000
    test_points: int = 500
    c: float = 1.0  # logistic regression: inverse L2 strength, scikit-learn's C
    max_iter: int = 100


@dataclasses.dataclass
class FactorVAEScoreConfig:
    batch_size: int = 64
    train_points: int = 1000
    test_points: int = 500
    variance_points: int = 5000
    prune_var: float = 0.01


@dataclasses.dataclass
class SAPConfig:
    c: float = 100.0
    max_iter: int = 100


@dataclasses.dataclass
class DCIConfig:
    alpha: float = 0.001
    max_iter: int = 1000
    tol: float = 1e-8


@dataclasses.dataclass
class DisentanglementConfig:
    metrics: list[str] = dataclasses.field(default_factory=lambda: list(DISENTANGLEMENT_METRICS))
    test_fraction: float = 0.333
    beta_vae: BetaVAEScoreConfig = dataclasses.field(default_factory=BetaVAEScoreConfig)
    factor_vae: FactorVAEScoreConfig = dataclasses.field(default_factory=FactorVAEScoreConfig)
    sap: SAPConfig = dataclasses.field(default_factory=SAPConfig)
    dci: DCIConfig = dataclasses.field(default_factory=DCIConfig)


@dataclasses.dataclass
class EvalConfig:
    split: str = "test"
    batch_size: int = 500
    iw_samples: int = 1000
    iw_batch: int = 2048
    mig_bins: int = 20
    max_examples: int | None = None
    lpips: str | None = None  # torchvision | an LPIPS state dict file: LPIPS of reconstructions
    image_size: int | None = None  # model=ldm: also PSNR/SSIM/LPIPS at this size, tiled
    tile: int | None = None  # the tiles' size in px (None: the training size)
    disentanglement: DisentanglementConfig = dataclasses.field(
        default_factory=DisentanglementConfig)


@dataclasses.dataclass
class FrechetConfig:
    samples: int = 1000  # generated images scored by the Fréchet distance (0 skips it)
    epochs: int = 3  # vae's own feature network: epochs over the training split (once)
    seed: int = 0  # its initial weights and batches
    model: str | None = None  # a torchvision classifier's name, instead of the own network
    weights: str | None = None  # its state_dict file (loaded with weights_only=True)
    resize: int = 224  # the torchvision model's input size


def prior_sampler() -> dict[str, Any]:
    return {"_target_": "vae_cli.samplers.base.PriorSampler"}


def dataset_overrides() -> dict[str, Any]:
    """Keys laid over a checkpoint's dataset config when not null (data moved since); any
    other dataset key may be added with +dataset.<key>=..."""
    return {"root": None, "download": None}


@dataclasses.dataclass
class EvalCommand:
    ckpt: str | None = None
    device: str = "auto"
    seed: int = 0
    out_dir: str | None = None
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    dataset: dict[str, Any] = dataclasses.field(default_factory=dataset_overrides)
    sampler: dict[str, Any] = dataclasses.field(default_factory=prior_sampler)
    fd: FrechetConfig = dataclasses.field(default_factory=FrechetConfig)
    limits: bool = True  # false lifts the resource bounds (vae_cli/config/limits.py)


@dataclasses.dataclass
class SampleCommand:
    ckpt: str | None = None
    num_samples: int = 64
    temperature: float = 1.0
    seed: int = 0
    device: str = "auto"
    out_dir: str | None = None
    pictures: bool = True
    split: str = "test"
    label: int | None = None  # a conditional model: draw this class only (None: every class)
    image_size: int | None = None  # model=ldm: decode latent maps of this size, tiled
    tile: int | None = None  # the tiles' size in px (None: the training size)
    dataset: dict[str, Any] = dataclasses.field(default_factory=dataset_overrides)
    sampler: dict[str, Any] = dataclasses.field(default_factory=prior_sampler)
    fd: FrechetConfig = dataclasses.field(default_factory=lambda: FrechetConfig(samples=0))
    limits: bool = True


@dataclasses.dataclass
class ExportCommand:
    ckpt: str | None = None
    format: str = "safetensors"
    out_dir: str | None = None
    device: str = "cpu"
    scaling_factor: float | None = None  # format=diffusers: None measures it on the data
    dataset: dict[str, Any] = dataclasses.field(default_factory=dataset_overrides)


PRECISIONS = ("fp32", "bf16", "fp16")
EXPORT_FORMATS = ("safetensors", "onnx", "diffusers")
SPLITS = ("train", "val", "test")


def typed(node: Any, schema: type, name: str) -> DictConfig:
    """``node`` merged onto its schema: unknown keys and wrong types become one line."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node or {})
    except OmegaConfBaseException as e:
        msg = one_line(e)
        key = getattr(e, "full_key", None)
        where = f"{name}.{key}" if name and key else (key or name)
        raise UserError(f"{where}: {msg}" if where else msg) from None


def positive(**values: Any) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"{key.replace('__', '.')}={value} must be a positive integer")


def finite(node: Any, where: str = "") -> None:
    """Every number in a config is finite: nan or inf anywhere is refused, naming the key
    (an interpolation that cannot be resolved is refused here too, by OmegaConf)."""
    if isinstance(node, DictConfig):
        for k in node:
            finite(node[k], f"{where}.{k}" if where else str(k))
    elif isinstance(node, list | tuple) or OmegaConf.is_list(node):
        for i, v in enumerate(node):
            finite(v, f"{where}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise UserError(f"{where}={node} must be a finite number")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise UserError(f"seed={seed!r} must be an integer in [0, 2^63)")


def check_out_dir(out_dir: str | None, ckpt: str | None = None) -> None:
    """The folder the outputs go to must be one we can write, known before the work: the
    out_dir given, else the run folder of the checkpoint read."""
    if out_dir:
        reason = unwritable(out_dir)
        if reason:
            raise UserError(f"out_dir={out_dir} cannot be written ({reason})")
    elif ckpt and Path(ckpt).is_file():
        folder = RunFolder.of_checkpoint(ckpt).path
        reason = unwritable(folder)
        if reason:
            raise UserError(f"the run folder {folder} of ckpt={ckpt} cannot be written "
                            f"({reason}); set out_dir=<a writable folder>")


def check_device(key: str, device: str) -> None:
    if not (device in ("auto", "cpu", "cuda", "mps") or device.startswith("cuda:")):
        raise UserError(f"{key}={device!r} is not auto, cpu, cuda, cuda:N or mps")


def validate_train(cfg: DictConfig) -> DictConfig:
    """`vae train`'s config: components, trainer, optim and seed; returns it typed."""
    unknown = set(cfg) - {*COMPONENTS, "optim", "trainer", "seed", "ckpt", "limits"}
    if unknown:
        raise UserError(f"unknown top-level key(s) {', '.join(sorted(unknown))}; "
                        "see vae train --cfg job for the keys")
    check_targets(cfg)
    finite(cfg)
    for group in (*COMPONENTS, "optim"):
        if group not in cfg:
            raise UserError(f"config has no {group!r} group")
        check_component(group, cfg[group])
    with open_dict(cfg):
        cfg.trainer = typed(cfg.get("trainer"), TrainerConfig, "trainer")
    t, o = cfg.trainer, cfg.optim
    positive(trainer__epochs=t.epochs, trainer__batch_size=t.batch_size,
             trainer__log_every=t.log_every, trainer__image_every=t.image_every,
             trainer__num_images=t.num_images, trainer__iw_samples=t.iw_samples,
             trainer__accumulate=t.accumulate,
             model__latent_dim=cfg.model.get("latent_dim"))
    if t.resume not in (True, False, "auto"):
        raise UserError(f"trainer.resume={t.resume!r} is not true, false or auto")
    if t.patience is not None and t.patience <= 0:
        raise UserError(f"trainer.patience={t.patience} must be positive or null")
    if t.max_minutes is not None and not (_number(t.max_minutes) and t.max_minutes > 0):
        raise UserError(f"trainer.max_minutes={t.max_minutes} must be a number > 0 or null")
    if t.precision not in PRECISIONS:
        raise UserError(f"trainer.precision={t.precision!r} is not one of {PRECISIONS}")
    check_device("trainer.device", t.device)
    if t.grad_clip is not None and not t.grad_clip > 0:
        raise UserError(f"trainer.grad_clip={t.grad_clip} must be > 0 or null")
    if t.skip_threshold is not None and not t.skip_threshold > 0:
        raise UserError(f"trainer.skip_threshold={t.skip_threshold} must be > 0 or null")
    positive(trainer__skip_limit=t.skip_limit)
    if t.ema is not None and not 0 < t.ema < 1:
        raise UserError(f"trainer.ema={t.ema} must be a decay in (0, 1) or null")
    if not _number(o.get("lr", 1)) or not o.get("lr", 1) > 0:
        raise UserError(f"optim.lr={o.lr} must be a number > 0")
    if not _number(o.get("weight_decay", 0)) or not o.get("weight_decay", 0) >= 0:
        raise UserError(f"optim.weight_decay={o.weight_decay} must be a number >= 0")
    if "eps" in o and not (_number(o.eps) and o.eps > 0):  # Adam: 0/0 where v is still 0
        raise UserError(f"optim.eps={o.eps} must be a number > 0")
    betas = o.get("betas", [0.0, 0.0])
    if len(betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas):
        raise UserError(f"optim.betas={list(betas)} must be two numbers in [0, 1)")
    check_seed(cfg.get("seed"))
    check_limits(cfg)
    return cfg


def check_limits(cfg: DictConfig) -> None:
    if not isinstance(cfg.get("limits", True), bool):
        raise UserError(f"limits={cfg.limits!r} must be true or false")
    limits.check(cfg)


def reader_command(cfg: DictConfig, schema: type) -> DictConfig:
    """What `vae eval` and `vae sample` share: typed, finite, a seed, a device, a folder, a
    sampler and the Fréchet distance's settings."""
    cfg = typed(cfg, schema, "")
    finite(cfg)
    check_limits(cfg)
    check_seed(cfg.seed)
    check_out_dir(cfg.out_dir, cfg.ckpt)
    check_device("device", cfg.device)
    check_sampler(cfg.sampler)
    check_fd(cfg.fd)
    return cfg


def check_sampler(node: DictConfig) -> None:
    """Keys and types against the sampler's signature, then its own range checks (a build
    with a placeholder latent size costs nothing next to loading a checkpoint)."""
    check_component("sampler", node)
    instantiate("sampler", node, latent_dim=1)


def check_fd(fd: DictConfig) -> None:
    if fd.samples < 0:
        raise UserError(f"fd.samples={fd.samples} must be >= 0 (0 skips the score)")
    positive(fd__epochs=fd.epochs, fd__resize=fd.resize)
    if not 0 <= fd.seed < 2**63:
        raise UserError(f"fd.seed={fd.seed} must be an integer in [0, 2^63)")
    if (fd.model is None) != (fd.weights is None):
        raise UserError("fd.model and fd.weights go together: a torchvision model name and "
                        "its weights file (or neither: vae's own features)")
    if fd.weights is not None and not Path(fd.weights).is_file():
        raise UserError(f"fd.weights={fd.weights} does not exist")


def validate_eval(cfg: DictConfig) -> DictConfig:
    cfg = reader_command(cfg, EvalCommand)
    e = cfg.eval
    if e.split not in SPLITS:
        raise UserError(f"eval.split={e.split!r} is not one of val, test, train")
    positive(eval__batch_size=e.batch_size, eval__iw_batch=e.iw_batch,
             eval__mig_bins=e.mig_bins)
    if e.iw_samples < 0:
        raise UserError(f"eval.iw_samples={e.iw_samples!r} must be >= 0 (0 skips the bound)")
    for key in ("max_examples", "image_size", "tile"):
        if e[key] is not None:
            positive(**{f"eval__{key}": e[key]})
    if e.lpips not in (None, "torchvision") and not Path(e.lpips).expanduser().is_file():
        raise UserError(f"eval.lpips={e.lpips} is neither torchvision nor a file")
    check_disentanglement(e.disentanglement)
    return cfg


def check_disentanglement(d: DictConfig) -> None:
    unknown = [m for m in d.metrics if m not in DISENTANGLEMENT_METRICS]
    if unknown:
        raise UserError(f"eval.disentanglement.metrics: {', '.join(map(str, unknown))} not "
                        f"among {', '.join(DISENTANGLEMENT_METRICS)}")
    if not 0 < d.test_fraction < 1:
        raise UserError(f"eval.disentanglement.test_fraction={d.test_fraction} must be in "
                        "(0, 1)")
    p = "eval__disentanglement__"
    b, f = d.beta_vae, d.factor_vae
    positive(**{f"{p}beta_vae__{k}": b[k] for k in ("batch_size", "train_points",
                                                     "test_points", "max_iter")},
             **{f"{p}factor_vae__{k}": f[k] for k in ("batch_size", "train_points",
                                                       "test_points", "variance_points")},
             **{f"{p}sap__max_iter": d.sap.max_iter, f"{p}dci__max_iter": d.dci.max_iter})
    if f.batch_size < 2 or f.variance_points < 2:
        raise UserError("eval.disentanglement.factor_vae: batch_size and variance_points must "
                        "be >= 2 (a variance needs two points)")
    for key, value in (("beta_vae.c", b.c), ("sap.c", d.sap.c), ("dci.tol", d.dci.tol)):
        if not value > 0:
            raise UserError(f"eval.disentanglement.{key}={value} must be > 0")
    for key, value in (("dci.alpha", d.dci.alpha), ("factor_vae.prune_var", f.prune_var)):
        if not value >= 0:
            raise UserError(f"eval.disentanglement.{key}={value} must be >= 0")


def validate_sample(cfg: DictConfig) -> DictConfig:
    cfg = reader_command(cfg, SampleCommand)
    positive(num_samples=cfg.num_samples)
    for key in ("image_size", "tile"):
        if cfg[key] is not None:
            positive(**{key: cfg[key]})
    if cfg.temperature < 0:
        raise UserError(f"temperature={cfg.temperature!r} must be >= 0 (0: a text model's "
                        "greedy decoding, an image model's prior means)")
    if cfg.split not in SPLITS:
        raise UserError(f"split={cfg.split!r} is not one of val, test, train")
    return cfg


def validate_export(cfg: DictConfig) -> DictConfig:
    cfg = typed(cfg, ExportCommand, "")
    if cfg.format not in EXPORT_FORMATS:
        raise UserError(f"format={cfg.format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    check_out_dir(cfg.out_dir, cfg.ckpt)
    check_device("device", cfg.device)
    if cfg.scaling_factor is not None and not (_number(cfg.scaling_factor)
                                               and cfg.scaling_factor > 0):
        raise UserError(f"scaling_factor={cfg.scaling_factor} must be a number > 0 or null")
    return cfg
