"""Image features for the Fréchet distance (frechet.py). No Inception weights ship with vae,
so by default it trains its own small network on the dataset's training split, once:

- a classifier of the dataset's labels (shapes and dsprites: the shape; mnist, cifar10...:
  the official classes; folder: its sub-folders) where every split is labelled;
- otherwise (celeba, a flat folder) an autoencoder reconstructing the images.

Either way the features are the 64 ReLU units of its penultimate layer. The trained network
is cached in <dataset root>/features/, keyed by a hash of the training images (and labels)
and its settings, and rebuilt when either changes or the file is unreadable.

Instead, ``fd.model=<torchvision classifier> fd.weights=<file>`` takes a user's torchvision
model (its state_dict, loaded with weights_only=True); its features are the input of its
last linear layer (the penultimate layer), for images resized to ``fd.resize`` and
normalised with the ImageNet statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vae_cli.data.base import Splits
from vae_cli.data.batching import gathered
from vae_cli.data.stream import is_stream
from vae_cli.errors import UserError, one_line
from vae_cli.runtime.files import save_cache
from vae_cli.runtime.progress import counted

log = logging.getLogger(__name__)

FORMAT = "vae_cli.features/1"
DIM = 64  # features of the own network
NOT_INCEPTION = "not comparable to Inception FID"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class Extractor:
    """Features of images in [0, 1], [N, C, H, W] -> [N, F]; its result's key and what it is."""

    net: Callable[[torch.Tensor], torch.Tensor]
    key: str
    description: str

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
        return torch.cat([self.net(images[i:i + batch]).double()
                          for i in range(0, len(images), batch)])


class OwnNet(nn.Module):
    """Three stride-2 3x3 convolutions, pooled to 4x4, then a 64-unit ReLU layer (the
    features); the head classifies (``classes``) or decodes the image linearly."""

    def __init__(self, channels: int, size: int, classes: int | None):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, DIM), nn.ReLU())
        self.head = nn.Linear(DIM, classes or channels * size * size)
        self.classes = classes

    def loss(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = self.head(self.body(x))
        if self.classes:
            return F.cross_entropy(out, y)
        return F.binary_cross_entropy_with_logits(out, x.flatten(1))


def own_extractor(data: Splits, cache: Path | None, epochs: int, seed: int,
                  batch: int = 128) -> Extractor:
    """vae's own network for this dataset: read from the cache folder, or trained on the
    training split (seeded) and written there."""
    x, classes = data.train, data.num_classes
    labels = data.labels["train"] if classes else None
    kind = "classifier" if classes else "autoencoder"
    settings = {"epochs": epochs, "seed": seed, "batch": batch, "dim": DIM, "kind": kind}
    path = None if cache is None else cache / f"{data.name}_{kind}_{digest(x, labels, settings)}.pt"
    net = OwnNet(x.shape[1], x.shape[-1], classes)
    state = read_cached(path)
    if state is None or not _loads(net, state):
        log.info("training the %s of %s's features (%d epochs, once)", kind, data.name, epochs)
        train_own(net.to(x.device), x, labels, epochs, seed, batch)
        save_feature_net(path, net)
    net = net.to(x.device).eval()
    return Extractor(net.body, f"fd_{data.name}_features",
                     f"Fréchet distance on vae's own {data.name} {kind} features "
                     f"({DIM}-d penultimate layer), {NOT_INCEPTION}")


def train_own(net: OwnNet, x: torch.Tensor, labels: torch.Tensor | None, epochs: int,
              seed: int, batch: int) -> None:
    """Adam at 1e-3 over shuffled minibatches; seeded, leaving the global generator as it
    was (the command's samples stay those of its own seed)."""
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(seed)
        for layer in net.modules():
            if isinstance(layer, nn.Conv2d | nn.Linear):
                layer.reset_parameters()
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        net.train()
        for _ in counted(epochs, "training the feature network", unit="epochs"):
            plan = torch.randperm(len(x), generator=gen).split(batch)
            for idx, xb in zip(plan, gathered(x, plan), strict=True):
                opt.zero_grad(set_to_none=True)
                y = None if labels is None else labels[idx.to(labels.device)]
                net.loss(xb.float() / 255, y).backward()
                opt.step()
        net.eval()


def digest(x: torch.Tensor, labels: torch.Tensor | None, settings: dict) -> str:
    """16 hex digits naming the training data and the settings the network is trained with."""
    h = hashlib.sha256(f"{FORMAT} {sorted(settings.items())} {tuple(x.shape)}".encode())
    if is_stream(x):  # its items' names, not their decoded pixels
        h.update(x.identity().encode())
    for t in (labels,) if is_stream(x) else (x, labels):
        if t is not None:
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def read_cached(path: Path | None) -> dict | None:
    """A cached network's weights, or None (missing, unreadable or foreign: retrained)."""
    if path is None or not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
        log.warning("ignoring unreadable feature cache %s (%s)", path, type(e).__name__)
        return None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        log.warning("ignoring foreign feature cache %s", path)
        return None
    return saved.get("state")


def _loads(net: nn.Module, state: object) -> bool:
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
            and all(torch.isfinite(v).all() for v in state.values())):
        return False
    try:
        net.load_state_dict(state)
    except RuntimeError:
        return False
    return True


def save_feature_net(path: Path | None, net: nn.Module) -> None:
    if path is None:
        return
    save_cache(path, {"format": FORMAT, "state": {k: v.cpu() for k, v in
                                                  net.state_dict().items()}},
               "the feature network", "it is retrained next time")


def torchvision_extractor(name: str, weights: str, resize: int,
                          device: torch.device) -> Extractor:
    """A torchvision classification model with the user's weights, cut before its last
    linear layer."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"fd.model={name!r} is not a torchvision classification model "
                        "(e.g. resnet18, mobilenet_v3_small)")
    state = load_weights(weights)
    # the classifier's width, from the last 2-D weight in the file (a fine-tuned head too)
    last = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    kwargs = {"num_classes": int(last[-1].shape[0])} if last else {}
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"fd.weights={weights} does not fit torchvision's {name}: "
                        f"{one_line(e)}") from None
    cut_last_linear(model)
    model = model.to(device).eval()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def net(x: torch.Tensor) -> torch.Tensor:
        x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", antialias=True,
                          align_corners=False)
        return model((x - mean) / std).flatten(1)

    return Extractor(net, f"fd_{name}_features",
                     f"Fréchet distance on {name} penultimate-layer features (weights "
                     f"{Path(weights).name}); Inception FID only with Inception-v3's own "
                     "weights and preprocessing")


def load_weights(weights: str) -> dict[str, torch.Tensor]:
    """A state_dict file, loaded as data (weights_only): a mapping of names to tensors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse a foreign file means "refuse"
        reason = one_line(e)
        raise UserError(f"fd.weights={weights} is not a readable weights file ({reason})"
                        ) from None
    if not (isinstance(state, dict) and state
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise UserError(f"fd.weights={weights} is not a state_dict (a mapping of names to "
                        "tensors)")
    return state


def cut_last_linear(model: nn.Module) -> None:
    """Replace the model's last nn.Linear (its classifier) by the identity."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError("fd.model has no linear classifier layer to cut")
    parent, _, child = names[-1].rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())


PYTORCH_FID = "pytorch_fid"


def pytorch_fid_extractor(weights: str, device: torch.device) -> Extractor:
    """pytorch-fid's FID Inception (pool3, 2048-d), its weights read from the user's copy of
    the file pytorch-fid downloads (pt_inception-2015-12-05-*.pth) through pytorch-fid's
    own loader: the file is offered to torch.hub's cache under the name it looks for, so
    the numbers are pytorch-fid's."""
    import tempfile

    try:
        from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
    except ImportError:
        raise UserError("fd.model=pytorch_fid needs the pytorch-fid package: pip install "
                        "pytorch-fid") from None
    hub, before = tempfile.mkdtemp(prefix="vae-fid-"), torch.hub.get_dir()
    cached = Path(hub) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[1]
    cached.parent.mkdir()
    cached.symlink_to(Path(weights).expanduser().resolve())
    torch.hub.set_dir(hub)
    try:
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                            normalize_input=True, use_fid_inception=True)
    except Exception as e:  # noqa: BLE001 - a foreign file: one line
        raise UserError(f"fd.weights={weights} is not pytorch-fid's FID Inception "
                        f"({one_line(e)})") from None
    finally:
        torch.hub.set_dir(before)
        shutil.rmtree(hub, ignore_errors=True)
    model = model.to(device).eval()

    def net(x: torch.Tensor) -> torch.Tensor:
        x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()
        return model(x)[0].flatten(1)

    return Extractor(net, "fd_inception_features",
                     "Fréchet distance on pytorch-fid's FID Inception (pool3, 2048-d): the "
                     "numbers pytorch-fid gives for the same images")


def extractor(fd, data: Splits, root: str | None) -> Extractor:
    """The features ``fd`` (the command's fd settings) asks for: pytorch-fid's Inception,
    a user's torchvision model, or vae's own network cached under the dataset's root."""
    device = data.train.device
    if fd.model == PYTORCH_FID:
        return pytorch_fid_extractor(fd.weights, device)
    if fd.model is not None:
        return torchvision_extractor(fd.model, fd.weights, fd.resize, device)
    cache = Path(root) / "features" if root else None
    return own_extractor(data, cache, fd.epochs, fd.seed)
