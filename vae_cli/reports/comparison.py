"""One table over runs (or multirun folders), read from their files (`vae compare`).

Columns: the overrides that differ between runs, then results: best and final validation
loss (metrics.csv), test NLL from the IWAE bound (or the negative ELBO), active units and
MIG (eval.json), and the other disentanglement scores where some run has them. Printed as
text, written as CSV and markdown.
"""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

import yaml

from vae_cli.errors import UserError, one_line
from vae_cli.runtime.files import write_text
from vae_cli.runtime.run_folder import (
    LOG,
    METRICS,
    RunFileError,
    RunFolder,
    read_eval,
    read_metrics,
)

RESULTS = ["epochs", "best_val_loss", "final_val_loss", "test_nll", "test_bpd", "test_ppl",
           "active_units", "mig"]
# eval.json's other disentanglement scores: columns only where some run has them, so tables of
# datasets without ground-truth factors stay narrow (dci_informativeness: an error, lower wins)
DISENTANGLEMENT = ["beta_vae", "factor_vae", "sap", "dci_disentanglement", "dci_completeness",
                   "dci_informativeness", "modularity"]
# likewise a discrete latent's codebook use (perplexity of the code usage, fraction of codes
# used) and the Fréchet distance of samples (fd_<dataset>_features: its name says whose)
OPTIONAL = [*DISENTANGLEMENT, "perplexity", "usage"]
# eval.json's keys a table shows: each must hold a number (or null) for the run to be read
SHOWN = {"nll_iwae", "nelbo", "bpd_iwae", "bpd", "ppl_iwae", "ppl", "active_units", "mig",
         *OPTIONAL}
FD = re.compile(r"fd_.*_features")
IGNORED = ("hydra.", "dataset.root", "ckpt", "trainer.device")


def find_runs(paths: list[str]) -> list[Path]:
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise UserError(f"{p} is not a folder; pass run or multirun folders")
        # a sweep job that failed before its first epoch has a log but no metrics: listed
        # with 0 epochs, so a sweep's table shows every job
        found = [p] if RunFolder(p).metrics.exists() else sorted(
            {m.parent for pattern in (METRICS, LOG) for m in p.rglob(pattern)},
            key=lambda r: str(r))
        runs += found
    if not runs:
        raise UserError(f"no runs (folders with metrics.csv) under {' '.join(paths)}")
    return runs


def _override_list(text: str) -> dict[str, str]:
    items = yaml.safe_load(text) or []
    if not isinstance(items, list) or not all(isinstance(o, str) for o in items):
        raise ValueError("not a list of overrides")
    pairs = (o.lstrip("+~").split("=", 1) for o in items if "=" in o)
    return {k: v for k, v in pairs if not k.startswith(IGNORED)}


def _overrides(run: Path) -> dict[str, str]:
    path = RunFolder(run).overrides
    if not path.exists():
        return {}
    try:
        return _override_list(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise RunFileError(f"{path} is unreadable ({one_line(e)})") from None


def _val_losses(path: Path) -> tuple[list[float], int]:
    rows = read_metrics(path)
    try:
        return [float(r["val_loss"]) for r in rows if r.get("val_loss")], len(rows)
    except (ValueError, TypeError) as e:
        raise RunFileError(f"{path} is unreadable ({one_line(e)})") from None


def collect(run: Path) -> dict:
    folder = RunFolder(run)
    val, epochs = _val_losses(folder.metrics)
    row: dict = {"run": str(run), "epochs": epochs,
                 "best_val_loss": min(val) if val else math.nan,
                 "final_val_loss": val[-1] if val else math.nan}
    path = folder.eval_json()
    e = read_eval(path)
    if e is not None:
        shown = {k: v for k, v in e.items() if k in SHOWN or FD.fullmatch(k)}
        bad = next((k for k, v in shown.items() if not number_or_null(v)), None)
        if bad:
            raise RunFileError(f"{path} is unreadable ({bad} is {type(shown[bad]).__name__}, "
                               "not a number)")
        row["test_nll"] = e.get("nll_iwae", e.get("nelbo", math.nan))
        row["test_bpd"] = e.get("bpd_iwae", e.get("bpd", math.nan))
        row["test_ppl"] = e.get("ppl_iwae", e.get("ppl", math.nan))  # text models
        row["active_units"] = e.get("active_units")
        row["mig"] = e.get("mig")
        row.update({k: v for k, v in shown.items() if k in OPTIONAL or FD.fullmatch(k)})
    return row


def number_or_null(v: object) -> bool:
    """What a cell may show: a number (not a bool) or null (a score not computed)."""
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool))


def readable(runs: list[Path], warn) -> list[Path]:
    """The runs whose files parse; each other one is skipped with one line naming the file
    (a corrupt or foreign metrics.csv, eval.json or overrides.yaml)."""
    good = []
    for run in runs:
        try:
            _overrides(run)
            collect(run)
        except RunFileError as e:
            warn(f"skipped {run}: {e}")
        else:
            good.append(run)
    if not good:
        raise UserError("no readable runs left to compare")
    return good


def build_table(runs: list[Path], sort: str | None = None,
                descending: bool = False) -> tuple[list[str], list[dict]]:
    overrides = {r: _overrides(r) for r in runs}
    keys = sorted({k for o in overrides.values() for k in o})
    differing = [k for k in keys if len({o.get(k) for o in overrides.values()}) > 1]
    rows = [{**{k: overrides[r].get(k, "") for k in differing}, **collect(r)} for r in runs]
    fds = sorted({k for r in rows for k in r if k.startswith("fd_")})
    scored = [k for k in OPTIONAL if any(k in r for r in rows)] + fds
    columns = ["run", *differing, *RESULTS, *scored]
    if sort:
        if sort not in columns:
            raise UserError(f"--sort {sort!r} is not a column: {', '.join(columns)}")

        def key(r: dict):
            v = r.get(sort)
            missing = v is None or v == "" or (isinstance(v, float) and math.isnan(v))
            return (missing, v if not missing else 0)

        rows.sort(key=key, reverse=descending)
        if descending:  # keep runs without the value last either way
            rows.sort(key=lambda r: key(r)[0])
    return columns, rows


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render(columns: list[str], rows: list[dict]) -> tuple[str, str]:
    """(fixed-width text, markdown)."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True))  # noqa: E731
    text = "\n".join([line(columns), *(line(r) for r in cells)])
    md = "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                    *("| " + " | ".join(r) + " |" for r in cells)])
    return text, md


def write_tables(columns: list[str], rows: list[dict], md: str, out: Path) -> None:
    """compare.csv and compare.md in ``out``."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows({c: _cell(r.get(c)) for c in columns} for r in rows)
    try:
        write_text(out / "compare.csv", buf.getvalue())
        write_text(out / "compare.md", md + "\n")
    except OSError as e:
        raise UserError(f"cannot write the tables into {out} ({e.strerror or e})") from None
