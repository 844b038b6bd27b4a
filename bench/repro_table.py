"""The rows of docs/reproductions.md's table from the run folders `bench/reproduce.sh`
writes: per preset the epochs run, whether the preset's own stopping rule ended training (else the
budget did), the optimizer steps, the wall time summed over invocations, the machine, the
test NLL and, for the disentanglement presets, the factor scores (`vae eval`'s eval.json),
and the published number it is compared with.

    python bench/repro_table.py        # every run under $VAE_REPRO_DIR (default ~/vae-runs)
    python bench/repro_table.py ~/vae-runs/vamp_binarized_mnist
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
from pathlib import Path

import yaml

# Published test NLL (nats) for the setting each preset trains: Tomczak & Welling 2018, the
# dynamicMNIST column of the results table; Burda et al. 2016, Table 1 (k = 5000).
PUBLISHED = {
    "vae_gated_binarized_mnist": 84.50,
    "vamp_binarized_mnist": 82.38,
    "hvae_vamp_binarized_mnist": 81.24,
    "vae_binarized_mnist": 86.76,
    "iwae_binarized_mnist": 84.78,
}
# Disentanglement scores from eval.json: MIG, the FactorVAE and beta-VAE scores, DCI
# disentanglement (their estimators are documented in docs/evaluation.md).
SCORES = {"mig": "MIG", "factor_vae": "FactorVAE", "beta_vae": "beta-VAE",
          "dci_disentanglement": "DCI"}


def wall(run: Path) -> tuple[int, str]:
    """Seconds summed over the invocations in wall.txt, and the machine; a row trained on
    several (a run moved to a GPU and back) lists each with its hours."""
    lines = (run / "wall.txt").read_text().splitlines() if (run / "wall.txt").is_file() else []
    hours: dict[str, float] = {}
    for line in filter(str.strip, lines):
        machine = re.sub(r"^\d+ s on \S+, ", "", line).split(":")[0]
        hours[machine] = hours.get(machine, 0.0) + int(line.split()[0]) / 3600
    seconds = round(sum(hours.values()) * 3600)
    if len(hours) < 2:
        return seconds, next(iter(hours), "?")
    return seconds, "; ".join(f"{h:.1f} h on {m}" for m, h in hours.items())


def stopped_by(val: list[float], patience: int | None, epochs: int) -> str:
    """What ended training: the preset's early stopping ("patience": that many epochs
    after the best), its epoch count, or else a budget or an interruption. Approximate for
    patience, which the trainer does not count during a warm-up."""
    best = min(range(len(val)), key=val.__getitem__) + 1 if val else 0
    if patience and len(val) - best >= patience:
        return "patience"
    return "epochs" if len(val) >= epochs else "budget"


def row(run: Path) -> dict:
    cfg = yaml.safe_load((run / ".hydra/config.yaml").read_text())
    overrides = yaml.safe_load((run / ".hydra/overrides.yaml").read_text())
    preset = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")),
                  run.name)
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val_loss"]) for r in rows]
    best = min(range(len(val)), key=val.__getitem__) + 1 if val else 0
    seconds, machine = wall(run)
    ev = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}
    nll = ev.get("nll_iwae")
    published = PUBLISHED.get(preset)
    scores = ", ".join(f"{name} {ev[k]:.3f}" for k, name in SCORES.items() if k in ev)
    return {"preset": preset, "epochs": len(val), "steps": rows[-1]["step"] if rows else 0,
            "best epoch": best,
            "stopped by": stopped_by(val, cfg["trainer"].get("patience"),
                                     cfg["trainer"]["epochs"]),
            "wall": f"{seconds / 3600:.1f} h", "machine": machine,
            "test NLL": f"{nll:.2f} (k={ev['iw_samples']}, {ev['examples']} images)"
            if nll is not None else "-",
            "best val -ELBO": f"{min(val):.2f}" if val else "-",
            "scores": scores or "-",
            "published": published if published is not None else "-",
            "difference": f"{nll - published:+.2f}" if nll is not None and published else "-"}


def repro_dir() -> Path:
    """Where bench/reproduce.sh keeps its runs: outside the work tree, so a fresh checkout
    finds them."""
    return Path(os.environ.get("VAE_REPRO_DIR", Path.home() / "vae-runs"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="*", type=Path)
    args = ap.parse_args()
    runs = args.runs or sorted(p for p in repro_dir().glob("*") if p.is_dir())
    rows = [row(r) for r in runs if (r / "metrics.csv").is_file()]
    if not rows:
        raise SystemExit("error: no run folder with a metrics.csv")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
