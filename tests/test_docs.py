"""Every shell command shown in README.md and docs/ runs, on tiny settings, or its block is
marked with the reason it cannot run offline (``<!-- docs-test: skip (reason) -->`` on the
line before it): the docs cannot drift from the tool.

A page's commands run in order in a folder of their own, in-process through the real
dispatcher (``vae_cli.commands.main.main``), as a reader would type them: ``<run>`` and
``outputs/<date>/<time>`` stand for the run the page trained last (or one trained here when
the page trained none), ``multirun/<date>/<time>`` for its last sweep. Tiny settings replace
the sizes a command gives or add them: one epoch, small splits, few samples.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
from hydra import compose, initialize_config_dir

from vae_cli.commands.main import main, register_resolvers
from vae_cli.config.registry import config_dir

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.*)\)\s*-->")
# Sizes that make a documented command a quick one; a command's own value is replaced.
TRAIN = {"trainer.epochs": "1", "trainer.batch_size": "16", "trainer.num_images": "4",
         "hydra.sweeper.n_trials": "2"}
DATA = {"n_train": "64", "n_val": "16", "n_test": "16"}
EVAL = {"eval.iw_samples": "4", "eval.max_examples": "32", "fd.samples": "0",
        "eval.disentanglement.metrics": "[]"}
SAMPLE = {"num_samples": "4"}
LINES = "the fox runs\na dog sleeps\nthe dog runs fast\na fox sleeps\n" * 8


@dataclass
class Block:
    page: Path
    line: int
    commands: list[str]
    skip: str | None  # the reason it cannot run here, when marked


def blocks(page: Path) -> list[Block]:
    """The page's ```bash blocks, each with its commands and any skip marker above it."""
    lines, found, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            above = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
            mark = SKIP.search(above)
            found.append(Block(page, i + 1, commands(lines[i + 1:end]),
                               mark.group(1).strip() if mark else None))
            i = end
        i += 1
    return found


def commands(body: list[str]) -> list[str]:
    """Shell lines: continuations joined, comments dropped, && chains split."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(body))
    out = []
    for line in text.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        out += [part.strip() for part in line.split("&&") if line and part.strip()]
    return out


def runnable(command: str) -> bool:
    return command.split()[0] in ("vae", "ruff") or command.startswith(
        ("pip install -e '.[", "python -m pytest"))


def test_every_shell_block_runs_here_or_says_why_not():
    assert PAGES[0].name == "README.md" and len(PAGES) > 10
    unmarked = [f"{b.page.name}:{b.line}: {c}" for page in PAGES for b in blocks(page)
                if b.skip is None for c in b.commands if not runnable(c)]
    assert not unmarked, f"neither run nor marked with a reason: {unmarked}"
    empty = [f"{b.page.name}:{b.line}" for page in PAGES for b in blocks(page)
             if b.skip is not None and not b.skip]
    assert not empty, f"skipped without a reason: {empty}"
    ran = [c for page in PAGES for b in blocks(page) if b.skip is None for c in b.commands]
    assert sum(c.startswith("vae ") for c in ran) >= 30


def test_the_readme_shows_the_test_command_ci_runs():
    readme = [c for b in blocks(PAGES[0]) for c in b.commands]
    assert "python -m pytest -q" in readme
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


def with_sizes(args: list[str], sizes: dict[str, str]) -> list[str]:
    """``args`` with each key of ``sizes`` set to its value: replaced where given."""
    given = {a.split("=", 1)[0]: i for i, a in enumerate(args) if "=" in a}
    args = list(args)
    for key, value in sizes.items():
        if key in given:
            args[given[key]] = f"{key}={value}"
        elif not key.startswith("hydra.sweeper") or any("optuna" in a for a in args):
            args.append(f"{key}={value}")
    return args


def dataset_keys(args: list[str]) -> set[str]:
    """The keys of the dataset a `vae train` command composes (a sweep's first job's)."""
    register_resolvers()
    plain = [a for a in args if "=" in a and not a.startswith(("hydra", "-"))]
    plain = [a if a.split("=", 1)[1].startswith("[") else a.split(",")[0] for a in plain]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return set(compose(config_name="train", overrides=plain).dataset)


def run_vae(args: list[str]) -> int:
    """The real dispatcher, in this process; Hydra's --help and --cfg end with exit()."""
    try:
        return main(args)
    except SystemExit as e:
        return int(e.code or 0)


class Reader:
    """Types a page's commands in order in its own folder; remembers what they made."""

    def __init__(self, folder: Path, data: Path, default_run: Path | None):
        self.folder, self.data, self.count = folder, data, 0
        self.run, self.sweep = default_run, None
        (folder / "lines.txt").write_text(LINES)

    def placeholders(self, command: str) -> str:
        if "multirun/<date>/<time>" in command:
            assert self.sweep, f"{command}: no sweep ran before it on this page"
            command = command.replace("multirun/<date>/<time>", str(self.sweep))
        for name in ("outputs/<date>/<time>", "outputs/<run>", "<run>"):
            command = command.replace(name, str(self.run))
        return command

    def vae(self, args: list[str]) -> None:
        if args[0] == "train" and not any(a.startswith("--") for a in args):
            self.count += 1
            run, sweep = self.folder / f"run{self.count}", self.folder / f"sweep{self.count}"
            keys = dataset_keys(args[1:])
            sizes = {**TRAIN, **{f"dataset.{k}": v for k, v in DATA.items() if k in keys}}
            warmup = [a.split("=")[1] for a in args if a.startswith("lr_scheduler.warmup_epochs=")]
            if warmup:  # a warm-up must end before the run does
                sizes["trainer.epochs"] = str(int(float(warmup[0])) + 1)
            if "root" in keys:
                sizes["dataset.root"] = str(self.data)
            args = [*with_sizes(args, sizes), f"hydra.run.dir={run}",
                    f"hydra.sweep.dir={sweep}"]
            assert run_vae(args) == 0, args
            self.run, self.sweep = (run, None) if run.is_dir() else (self.run, sweep)
            return
        sizes = {"eval": EVAL, "sample": SAMPLE}.get(args[0], {})
        assert run_vae(with_sizes(args, sizes)) == 0, args

    def type(self, command: str) -> None:
        if command.startswith("pip install -e '.["):  # what CI itself installs
            extras = re.findall(r"\.\[([\w,]+)\]", command)[0].split(",")
            declared = tomllib.loads((ROOT / "pyproject.toml").read_text())
            assert set(extras) <= set(declared["project"]["optional-dependencies"])
        elif command.startswith("python -m pytest"):  # this suite: CI runs it
            assert command in (ROOT / ".ci" / "run").read_text()
        elif command.startswith("ruff"):
            subprocess.run([sys.executable, "-m", *shlex.split(command)], cwd=ROOT,
                           check=True, capture_output=True)
        else:
            self.vae(shlex.split(self.placeholders(command))[1:])


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("docs-data")


@pytest.fixture(scope="session")
def default_run(tmp_path_factory, data_root):
    """A run for pages that use one without training it first (export, evaluation)."""
    reader = Reader(tmp_path_factory.mktemp("docs-default"), data_root, None)
    reader.type("vae train")
    return reader.run


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.skip is None and b.commands
                                                          for b in blocks(p))],
                         ids=lambda p: p.name)
def test_a_pages_commands_run(page, tmp_path, data_root, default_run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reader = Reader(tmp_path, data_root, default_run)
    for block in blocks(page):
        if block.skip is None:
            for command in block.commands:
                reader.type(command)
