"""One pass over the training split."""

from __future__ import annotations

import torch

from vae_cli.config.schemas import TrainerConfig
from vae_cli.data.base import Splits
from vae_cli.data.batching import shuffled
from vae_cli.errors import UserError
from vae_cli.runtime import distributed
from vae_cli.runtime.progress import bar as progress_bar
from vae_cli.training.signals import StopFlag
from vae_cli.training.state import EpochProgress, TrainState
from vae_cli.training.step import Stepper


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """A signal arrived mid-epoch: the state's progress says where the epoch stands."""


def train_epoch(stepper: Stepper, data: Splits, t: TrainerConfig, order: torch.Generator,
                state: TrainState, stop: StopFlag | None = None,
                desc: str = "") -> dict[str, float]:
    """Mean terms of one epoch; metrics stay on the device until the end. Continues a
    stopped epoch from ``state.progress``. Raises StopRequested, with ``state.progress``
    set, when ``stop`` was raised: enough to finish the epoch after a resume exactly as if
    it had not stopped."""
    device = data.train.device
    progress, state.progress = state.progress, None
    epoch_order = progress.order if progress else order.get_state()
    order.set_state(epoch_order)
    first = progress.batch if progress else 0
    names = progress.names if progress else None
    sums = progress.sums.to(device) if progress else None
    window = Window()  # each batch's loss since the last sync point
    n = len(data.train) // t.batch_size
    bar = progress_bar(n, desc, initial=first)
    stepper.objective.train()
    shard = stepper.shard
    # a conditional model reads each example's class; an unconditional one gets None
    labels = data.labels_for("train", stepper.objective.model.conditional)
    batches = shuffled(data.train, t.batch_size, order, data.binarize, first, shard, labels,
                       t.bucket)
    k = t.accumulate
    for i, (xb, yb) in enumerate(batches, start=first):
        group = min(k, n - (i - i % k))  # the batches this optimizer step sums
        update = (i % k) + 1 == group
        out = stepper(xb, state.step, yb, scale=1 / group, update=update)
        state.step += update
        values = torch.stack([v.detach().float() for v in out.values()])
        if sums is None:
            names, sums = list(out), torch.zeros_like(values)
        sums += values
        window.add(values[0], state.step)
        last = i + 1 == n
        # Ranks agree at the same steps: a signal is acted on at the next such step.
        alone = shard.world == 1 and stop is not None and stop.signum
        # ... and only where an optimizer step ends: no summed gradient is left unapplied
        if update and ((i + 1) % (t.log_every * k) == 0 or last or alone):
            agree(window.first_bad(), stop)
            loss = values[0].item()
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update((i + 1) - bar.n)
            for hook in stepper.hooks.on_log:
                hook(state.step, {"loss": loss})
            if stop and stop.signum and not last:
                state.progress = EpochProgress(epoch_order, i + 1, names,
                                               distributed.all_mean(sums.clone()).cpu())
                bar.close()
                raise StopRequested
    bar.close()
    return dict(zip(names, distributed.all_mean(sums).div(n).tolist(), strict=True))


class Window:
    """The losses of the batches since the last sync point, kept as they are (views of
    each step's metrics, no copy): checked for the first non-finite one at the sync point,
    not with a test per step, whose operations each cost a launch on a GPU."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.steps: list[int] = []

    def add(self, loss: torch.Tensor, step: int) -> None:
        self.losses.append(loss)
        self.steps.append(step)

    def first_bad(self) -> torch.Tensor:
        """The step of the window's first non-finite loss, or -1, on the device; empties it."""
        losses = torch.stack(self.losses)
        steps = torch.tensor(self.steps, device=losses.device)
        none = torch.iinfo(steps.dtype).max
        first = torch.where(torch.isfinite(losses), none, steps).min()
        self.losses, self.steps = [], []
        return torch.where(first == none, -1, first)


def agree(bad_step: torch.Tensor, stop: StopFlag | None) -> None:
    """What the ranks settle at a sync point: a signal any of them received is taken by
    all, and the first non-finite step stops the run in one line."""
    signum = stop.signum if stop and stop.signum else 0
    flags = torch.stack([bad_step, torch.full_like(bad_step, signum)])
    bad, signum = distributed.all_max(flags).tolist()
    if stop and signum:
        stop.signum = signum
    if bad >= 0:
        raise UserError(f"loss became non-finite at step {bad}; the last good checkpoint "
                        "is kept (lower optim.lr, or trainer.detect_anomaly=true to find "
                        "the operation)")
