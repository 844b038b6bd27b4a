"""The graph-safe training step (``trainer.cuda_graph=true``): the whole step (forward,
backward, clipping, optimizer update) as one function of tensors that stay where they are,
so that on CUDA it is captured once into a CUDA graph and then replayed, one launch per
step instead of hundreds. Small VAEs are launch-bound: per-operation Python and launch
overhead, not arithmetic, sets their speed on a GPU.

What makes it graph-safe, each a change from the ordinary step (training/step.py):

- static inputs: each batch (and its labels) is copied into buffers the graph reads;
- the step counter is a float64 device tensor filled before each step, so a schedule's
  weight (objective/schedules.py takes numbers or tensors) is computed on the device, to
  the same float32 value the ordinary step gets from Python;
- the learning rate is a device tensor in each parameter group: an LR schedule writes it
  in place (torch's schedulers ``fill_`` a tensor lr), and the update reads it on the device;
- the optimizer is built with ``capturable=True`` on CUDA (its step count on the device);
- the sampling noise is drawn inside the step from the default generator, which CUDA
  graphs advance on every replay;
- no host synchronisation inside the step: the loop accumulates metric sums on the device
  and reads them at its log points (training/loop.py).

The after-update hooks (LR schedule, EMA of the weights) run eagerly after each step. On
CPU the same function runs eagerly: tests check it takes the ordinary step's weights and
metrics, bit for bit, so the GPU differs only by capture. What the step cannot hold is
refused in one line before any work (``refusal``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vae_cli.errors import UserError, one_line, out_of_memory
from vae_cli.objective.bounds import Objective
from vae_cli.objective.hierarchy import TwoLevel
from vae_cli.objective.posteriors import DiagonalGaussian
from vae_cli.runtime.device import autocast
from vae_cli.training.step import Stepper

# posteriors whose sampling and density are tensor work alone (the two-level one draws z1
# given z2 with the same default generator)
GRAPH_SAFE_FAMILIES = (DiagonalGaussian, TwoLevel)
WARMUP = 3  # eager steps on a side stream before capture, as CUDA graphs require


def refusal(objective: Objective, t, world: int) -> str | None:  # noqa: ANN001
    """Why trainer.cuda_graph=true cannot take this run (None: it can)."""
    why = {
        "trainer.accumulate > 1 (a step of several batches)": t.accumulate > 1,
        "trainer.precision=fp16 (loss scaling reads its overflow check on the host)":
            t.precision == "fp16",
        "trainer.compile=true (use one or the other)": t.compile,
        "several processes (torchrun)": world > 1,
        "trainer.detect_anomaly=true": t.detect_anomaly,
        "trainer.skip_threshold (a decision on the host at each step)":
            t.skip_threshold is not None,
        "a network trained beside the model (a critic or discriminator)":
            bool(objective.auxiliaries()),
        "token sequences (their scored positions vary per batch)":
            objective.model.autoregressive,
        f"posterior={objective.model.family.option} (only the Gaussian posteriors are "
        "graph-safe)": type(objective.model.family) not in GRAPH_SAFE_FAMILIES,
    }
    found = next((k for k, v in why.items() if v), None)
    return None if found is None else f"trainer.cuda_graph=true cannot take {found}"


def tensor_lr(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Each group's lr as a device tensor, written in place from now on. float32 on CUDA:
    the fused CUDA kernel reads a tensor lr as float32, the type it casts a float lr to for
    float32 weights, so the update is the same; float64 elsewhere, as the CPU kernel uses."""
    dtype = torch.float32 if device.type == "cuda" else torch.float64
    for group in opt.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=dtype, device=device)


@dataclass
class GraphStepper(Stepper):
    """A Stepper whose step is graph-safe, captured on CUDA (``capture``) and run eagerly
    elsewhere. Same call, same terms, one optimizer step per batch."""

    capture: bool = False
    step_t: torch.Tensor = field(init=False)
    graph: torch.cuda.CUDAGraph | None = field(default=None, init=False)
    inputs: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, init=False)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.step_t = torch.zeros((), dtype=torch.float64, device=self.device)
        tensor_lr(self.opt, self.device)

    def __call__(self, x: torch.Tensor, step: int, y: torch.Tensor | None = None,
                 scale: float = 1.0, update: bool = True) -> dict[str, torch.Tensor]:
        if self.inputs is None:
            self.inputs = (x.clone(), None if y is None else y.clone())
        static_x, static_y = self.inputs
        static_x.copy_(x)
        if static_y is not None:
            static_y.copy_(y)
        self.step_t.fill_(step)
        if self.capture:
            if self.graph is None:
                self.graph = self.captured()
            self.graph.replay()
        else:
            self.opt.zero_grad(set_to_none=True)
            self.outputs = self.body()
        for hook in self.hooks.after_update:
            hook(step + 1)
        return self.outputs

    def body(self) -> dict[str, torch.Tensor]:
        """The step on the static inputs: every operation stays on the device."""
        x, y = self.inputs
        with autocast(self.device, self.precision):
            terms, _ = self.net(x, self.step_t, self.shard, y)
        terms["loss"].backward()
        terms = {**terms, **self.clipped()}  # no skipping here (refused): clipping alone
        for hook in self.hooks.after_backward:
            hook()
        self.opt.step()
        return terms

    def captured(self) -> torch.cuda.CUDAGraph:
        """The step captured into a CUDA graph. The warm-up steps that capture needs are
        rehearsals: the weights, optimizer state and random state they changed are put
        back in place (the graph keeps the tensors' addresses), so the run is the one the
        eager step takes."""
        with rehearsal(self.objective, self.opt, self.device):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP):
                    self.opt.zero_grad(set_to_none=True)
                    self.body()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.opt.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.outputs = self.body()
            except RuntimeError as e:  # the same step ran eagerly above: capture refused it
                if out_of_memory(e):
                    raise
                raise UserError(f"trainer.cuda_graph=true: this step cannot be captured into "
                                f"a CUDA graph ({one_line(e)}); trainer.cuda_graph=false trains "
                                "it") from e
        return graph


class rehearsal:  # noqa: N801 - used as a context manager
    """Puts back, in place, what steps taken inside it changed: parameters and buffers,
    the optimizer's state (zeroed where it was not yet created: Adam starts from zeros)
    and the random state of the CPU and the device."""

    def __init__(self, module: nn.Module, opt: torch.optim.Optimizer, device: torch.device):
        self.module, self.opt, self.device = module, opt, device

    def __enter__(self) -> rehearsal:
        self.weights = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.state = {id(p): {k: v.clone() for k, v in s.items()
                              if isinstance(v, torch.Tensor)}
                      for p, s in self.opt.state.items()}
        self.rng = torch.get_rng_state()
        self.cuda_rng = (torch.cuda.get_rng_state(self.device)
                         if self.device.type == "cuda" else None)
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for k, v in self.module.state_dict().items():
                v.copy_(self.weights[k])
            for p, s in self.opt.state.items():
                saved = self.state.get(id(p), {})
                for k, v in s.items():
                    if isinstance(v, torch.Tensor):
                        v.copy_(saved[k]) if k in saved else v.zero_()
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)


def graph_safe(stepper: Stepper, capture: bool) -> GraphStepper:
    """The graph-safe form of an ordinary stepper (the same networks and optimizer)."""
    fields = {k: getattr(stepper, k) for k in ("net", "objective", "opt", "device",
                                                "precision", "shard", "aux_opts",
                                                "reduce_grads", "hooks", "scaler",
                                                "grad_clip")}
    return GraphStepper(**fields, capture=capture)

