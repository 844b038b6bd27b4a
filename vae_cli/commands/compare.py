"""`vae compare DIR...`: one table over runs (or multirun folders) from their files.

Columns: the overrides that differ between runs, then results: best and final validation
loss (metrics.csv), test NLL from the IWAE bound (or the negative ELBO), active units and
the disentanglement scores (eval.json). Printed as text, written as CSV and markdown.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vae_cli.commands.plain import Parser
from vae_cli.errors import UserError
from vae_cli.reports.comparison import build_table, find_runs, readable, render, write_tables


def main(argv: list[str]) -> int:
    parser = Parser(prog="vae compare", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="run folders or multirun folders")
    parser.add_argument("--sort", help="column to sort by (e.g. test_nll, best_val_loss)")
    parser.add_argument("--desc", action="store_true", help="sort descending")
    parser.add_argument("--out", help="folder for compare.csv/.md (default: the first DIR)")
    args = parser.parse_args(argv)
    found = find_runs(args.dirs)  # first: each DIR must be a folder
    out = Path(args.out or args.dirs[0])
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a folder for compare.csv/.md")
    runs = readable(found, lambda line: print(f"warning: {line}", file=sys.stderr))
    columns, rows = build_table(runs, args.sort, args.desc)
    text, md = render(columns, rows)
    write_tables(columns, rows, md, out)
    print(text)
    print(f"\nwrote {out / 'compare.csv'} and {out / 'compare.md'}")
    return 0
