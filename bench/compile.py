"""Does trainer.compile=true pay for a preset on this machine? Times vae's own training step
(the Stepper the recipe builds, Adam, the preset's objective) eager and compiled, on random
binary batches of the preset's image shape, alternating the two sides in rounds, and prints
the median seconds per step and the ratio.

    python bench/compile.py vamp_binarized_mnist            # one thread, 6 rounds of 20 steps
    python bench/compile.py vae_gated_binarized_mnist --threads 2 --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir

from vae_cli.config.build import build_objective
from vae_cli.config.registry import config_dir
from vae_cli.config.schemas import validate_train
from vae_cli.training.optimizers import build_optimizer
from vae_cli.training.recipe import training_net
from vae_cli.training.step import Stepper


def stepper(preset: str, compiled: bool) -> tuple[Stepper, torch.Tensor, int]:
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = validate_train(compose("train", [f"experiment={preset}", "trainer.device=cpu"]))
    torch.manual_seed(0)
    objective = build_objective(cfg, (1, 28, 28), 50000)
    opt = build_optimizer(cfg.optim, objective.main_parameters(), compiled)
    net = training_net(objective, opt, compiled, torch.device("cpu"))
    batch = torch.bernoulli(torch.rand(cfg.trainer.batch_size, 1, 28, 28))
    return Stepper(net, objective, opt, torch.device("cpu")), batch, 0


def seconds_per_step(run: Stepper, x: torch.Tensor, start: int, steps: int) -> float:
    t0 = time.perf_counter()
    for i in range(steps):
        run(x, start + i)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("preset")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sides = {name: stepper(args.preset, name == "compiled") for name in ("eager", "compiled")}
    for run, x, _ in sides.values():  # warm-up: compilation happens here
        seconds_per_step(run, x, 0, 3)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, (run, x, _) in sides.items():
            times[name].append(seconds_per_step(run, x, 3 + r * args.steps, args.steps))
    eager, compiled = (statistics.median(times[n]) for n in ("eager", "compiled"))
    print(f"{args.preset}, {args.threads} thread(s), median of {args.rounds} rounds of "
          f"{args.steps} steps: eager {eager * 1000:.1f} ms/step, compiled "
          f"{compiled * 1000:.1f} ms/step, compiled/eager {compiled / eager:.2f}")


if __name__ == "__main__":
    main()
