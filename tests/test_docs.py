"""Every shell command shown in README.md and docs/ runs, on tiny settings, or its block is
marked with the reason it cannot run offline: the docs cannot drift from the tool.

Commands are harvested from ```bash blocks (``\\`` continuations joined, ``#`` comments
dropped, ``&&`` chains split). An HTML comment on the line right before a block says how
the block is taken:

- ``<!-- docs-test: skip (reason) -->``: not run here (a download, a server, a cluster,
  hours); its ``vae`` commands must still compose (every group option and key exists) and
  the scripts it names must exist;
- ``<!-- docs-test: exit N -->``: a refusal the page shows; every command must exit with N.

A block's commands run in order, as a reader would type them, in a folder of their own,
in-process through the real dispatcher (``vae_cli.commands.main.main``); ``vae --help``
runs as a process of the installed ``vae`` script, and the launchers start their own. A
block is cut before each ``vae train`` that starts a new run, so that the pieces spread
over the test processes. ``<run>``, ``outputs/<date>/<time>`` and ``<vq run>`` stand for
the run the piece trained last (or a run trained once per test process when it trained
none), ``multirun/<date>/<time>`` for its last sweep. A `vae train` shown on two pages runs
once per test process; a resume works on a copy of its run. Tiny settings replace the
sizes a command gives or add them: one epoch, small splits, few samples and importance
samples.
"""

from __future__ import annotations

import csv
import functools
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from hostile import in_process, once
from hydra import compose, initialize_config_dir

from vae_cli.commands.main import register_resolvers
from vae_cli.config.registry import config_dir

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^<!--\s*docs-test:\s*(?:skip\s*\((?P<reason>.*)\)|exit\s+(?P<code>\d+))"
                  r"\s*-->$")
# Sizes that make a documented command a quick one; a command's own value is replaced.
TRAIN = {"trainer.epochs": "1", "trainer.batch_size": "16", "trainer.num_images": "4",
         "hydra.sweeper.n_trials": "2"}
DATA = {"n_train": "64", "n_val": "16", "n_test": "16"}
EVAL = {"eval.iw_samples": "4", "eval.max_examples": "32", "fd.samples": "0",
        "eval.disentanglement.metrics": "[]"}
SAMPLE = {"num_samples": "4"}
SAMPLERS = {"pixelcnn": {"sampler.epochs": "1", "sampler.layers": "2"},
            "gmm": {"sampler.inits": "1"}, "two_stage": {"sampler.steps": "20"}}
# Run as a process of the installed script: the entry point itself is part of the docs.
PROCESSES = ("vae --help",)
# Pieces that start processes or load a library's machinery: started first, so that the
# test processes share the work evenly (pytest-xdist hands out tests in collection order).
SLOW = ("vae train -m ", "hparams_search=", "logger=mlflow", "logger=wandb", "format=onnx")
# Runs this test process trained, by their arguments: a page repeating a `vae train`
# (README and index both show the set-up) reuses the run, the commands after it read it.
TRAINED: dict[tuple[str, ...], Path] = {}
LINES = "the fox runs\na dog sleeps\nthe dog runs fast\na fox sleeps\n" * 8


@dataclass
class Block:
    page: Path
    line: int
    commands: list[str]
    skip: str | None = None  # the reason it cannot run here, when marked
    exit: int = 0  # the exit code every command of the block must end with


def fences(page: Path) -> list[tuple[int, str, list[str]]]:
    """(line of the opening fence, language, body) of every fenced block of the page."""
    lines, found, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):  # a list item's block is indented
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            found.append((i + 1, lines[i].strip()[3:].strip(), lines[i + 1:end]))
            i = end
        i += 1
    return found


def blocks(page: Path) -> list[Block]:
    """The page's ```bash blocks, each with its commands and the marker above it."""
    lines, found = page.read_text().splitlines(), []
    for line, language, body in fences(page):
        if language != "bash":
            continue
        block = Block(page, line, commands(body))
        above = next((ln.strip() for ln in reversed(lines[:line - 1]) if ln.strip()), "")
        if mark := MARK.match(above):
            block.skip = None if mark["reason"] is None else mark["reason"].strip()
            block.exit = int(mark["code"] or 0)
        found.append(block)
    return found


def commands(body: list[str]) -> list[str]:
    """Shell lines: continuations joined, comments dropped, && chains split."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(body))
    out = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s+)#.*$", "", line).strip()
        out += [part.strip() for part in line.split("&&") if part.strip()]
    return out


def problems(page: Path) -> list[str]:
    """What would let a command escape this test: a marker that is misspelt or applies to
    no block, a shell block in another language, a command indented instead of fenced."""
    lines, found = page.read_text().splitlines(), []
    inside = {n for line, _, body in fences(page) for n in range(line, line + len(body) + 2)}
    for n, text in enumerate(lines, 1):
        where = f"{page.relative_to(ROOT)}:{n}"
        if text.strip().startswith("<!--") and "docs-test" in text:
            after = next((ln.strip() for ln in lines[n:] if ln.strip()), "")
            if not MARK.match(text.strip()):
                found.append(f"{where}: not a docs-test marker: {text.strip()}")
            elif after != "```bash":
                found.append(f"{where}: the marker is not right before a ```bash block")
        if n not in inside and re.match(r"(    |\t)\s*(vae|python|pip|bash|torchrun|mkdocs)\s",
                                        text):
            found.append(f"{where}: an indented command; put it in a ```bash block")
    for line, language, _ in fences(page):
        if language in ("sh", "console", "zsh") or language.startswith("shell"):
            found.append(f"{page.relative_to(ROOT)}:{line}: ```{language}: use ```bash")
    for block in blocks(page):
        if block.skip == "":
            found.append(f"{page.relative_to(ROOT)}:{block.line}: skipped without a reason")
    return found


def runnable(command: str) -> bool:
    return command.split()[0] in ("vae", "ruff") or command.startswith(
        ("pip install -e '.[", "python -m pytest", "mkdocs build"))


def fresh_train(command: str) -> bool:
    """A `vae train` that starts a new run (not a resume, not --help or --cfg)."""
    words = command.split()
    return (words[:2] == ["vae", "train"] and not any(w.startswith("--") for w in words)
            and not resume(words))


def resume(words: list[str]) -> bool:
    return words[:2] == ["vae", "train"] and any(
        w.startswith(("ckpt=", "trainer.resume=")) for w in words)


@dataclass
class Piece:
    block: Block
    part: int  # the block's piece: 0, 1, ...
    commands: list[str]
    alone: bool  # the block is one piece

    def __str__(self) -> str:
        name = f"{self.block.page.name}:{self.block.line}"
        return name if self.alone else f"{name}-{self.part + 1}"


def pieces() -> list[Piece]:
    """Every block that runs, cut before each `vae train` that starts a new run."""
    out = []
    for page in PAGES:
        for block in blocks(page):
            if block.skip is not None or not block.commands:
                continue
            parts: list[list[str]] = [[]]
            for command in block.commands:
                if fresh_train(command) and any(c.startswith("vae ") for c in parts[-1]):
                    parts.append([])
                parts[-1].append(command)
            out += [Piece(block, i, part, len(parts) == 1) for i, part in enumerate(parts)]
    return sorted(out, key=lambda p: -sum(3 * ("hydra/launcher=" in c) + any(s in c for s in SLOW)
                                          for c in p.commands))


def test_every_command_runs_here_or_is_marked_with_a_reason():
    assert PAGES[0].name == "README.md" and len(PAGES) > 10
    found = [p for page in PAGES for p in problems(page)]
    found += [f"{b.page.relative_to(ROOT)}:{b.line}: {c}: not a command this test runs; "
              "mark its block <!-- docs-test: skip (reason) -->"
              for page in PAGES for b in blocks(page) if b.skip is None
              for c in b.commands if not runnable(c)]
    assert not found, "\n".join(found)
    ran = [c for page in PAGES for b in blocks(page) if b.skip is None for c in b.commands]
    assert sum(c.startswith("vae ") for c in ran) >= 30  # the harvest found the commands


def test_the_readme_shows_the_test_command_ci_runs():
    assert "pip install -e '.[test]' && python -m pytest -q" in PAGES[0].read_text()
    readme = [c for b in blocks(PAGES[0]) if b.skip is None for c in b.commands]
    assert "pip install -e '.[test]'" in readme and "python -m pytest -q" in readme
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


def hydra_command(command: str) -> tuple[str, list[str]] | None:
    """The `vae` subcommand and overrides a shell line runs, when it runs one."""
    words = shlex.split(re.sub(r"<[^>]*>", "x", command))
    if words[0] == "vae":  # compare and shard take plain arguments: no config to compose
        return None if words[1] in ("compare", "shard") else (words[1], words[2:])
    if "vae_cli" in words:  # torchrun ... -m vae_cli train ...
        at = words.index("vae_cli")
        return words[at + 1], words[at + 2:]
    if words[:2] == ["bash", "bench/reproduce.sh"]:  # vae train experiment=<preset> ...
        return "train", [f"experiment={words[2]}", *words[3:]]
    return None


def overrides(args: list[str]) -> list[str]:
    """A command's overrides as one job of it: a sweep's first values, no flags."""
    kept = [a for a in args if "=" in a and not a.startswith("-")]
    return [a if a.split("=", 1)[1].startswith("[") else a.split(",")[0] for a in kept]


def composed(name: str, args: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=name, overrides=overrides(args), return_hydra_config=True)


def test_a_skipped_command_still_names_real_options_and_files():
    """What cannot run here is checked as far as it can be: a `vae` command's config
    composes (a misspelt key or option fails), a script it names exists."""
    checked = 0
    for page in PAGES:
        for block in blocks(page):
            for command in block.commands if block.skip else ():
                where = f"{page.relative_to(ROOT)}:{block.line}: {command}"
                for script in re.findall(r"\b(bench/\S+\.(?:py|sh))\b", command):
                    assert (ROOT / script).is_file(), f"{where}: no {script}"
                if found := hydra_command(command):
                    try:
                        composed(*found)
                    except Exception as e:
                        pytest.fail(f"{where}: does not compose: {e}")
                    checked += 1
    assert checked >= 10


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


def run_vae(args: list[str], cwd: Path) -> tuple[int, str]:
    """`vae <args>` through the real dispatcher, in this process (hostile.in_process): the
    exit code and what it printed to stderr, which pytest shows with a failure."""
    done = in_process(*args, cwd=cwd, check=False)
    sys.stderr.write(done.stderr)
    return done.returncode, done.stderr.strip()


@functools.cache
def dataset_keys(choices: tuple[str, ...]) -> set[str]:
    """The keys of the dataset a `vae train` with these group choices composes."""
    return set(composed("train", list(choices)).dataset)


def epochs_done(run: Path) -> int:
    with open(run / "metrics.csv", newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


class Reader:
    """Types a block's commands in order in its own folder; remembers what they made."""

    def __init__(self, folder: Path, data: Path, shared_run: Callable[[], Path]):
        self.folder, self.data, self.shared_run, self.count = folder, data, shared_run, 0
        self.run: Path | None = None
        self.sweep: Path | None = None
        self.shared = False  # self.run may be read by other tests: a resume takes a copy
        (folder / "lines.txt").write_text(LINES)

    def placeholders(self, command: str) -> str:
        if "multirun/<date>/<time>" in command:
            assert self.sweep, f"{command}: no sweep ran before it"
            command = command.replace("multirun/<date>/<time>", str(self.sweep))
        if not re.search(r"<(date|run|vq run)>", command):
            return command
        if self.run is None:
            self.run, self.shared = self.shared_run(), True
        if resume(command.split()) and self.shared:  # a resume changes a run: a copy of it
            self.count += 1
            self.run = shutil.copytree(self.run, self.folder / f"run{self.count}")
            self.shared = False
        for name in ("outputs/<date>/<time>", "outputs/<run>", "<vq run>", "<run>"):
            command = command.replace(name, str(self.run))
        return command

    def type(self, command: str, expect: int = 0) -> None:
        if command.startswith("pip install -e '.["):  # CI installs it; the extras exist
            extras = re.findall(r"\.\[([\w,-]+)\]", command)[0].split(",")
            declared = metadata.metadata("vae-cli").get_all("Provides-Extra") or []
            assert set(extras) <= set(declared), f"{command}: extras are {declared}"
        elif command.startswith("python -m pytest"):  # this suite: CI runs it
            assert command in (ROOT / ".ci" / "run").read_text()
        elif command.startswith("ruff "):  # no cache written into the checkout
            done = subprocess.run([sys.executable, "-m", *shlex.split(command), "--no-cache"],
                                  cwd=ROOT, capture_output=True, text=True)
            assert done.returncode == 0, f"{command}:\n{done.stdout}{done.stderr}"
        elif command.startswith("mkdocs build"):  # the site, built outside the checkout
            done = subprocess.run([sys.executable, "-m", *shlex.split(command), "--quiet",
                                   "--site-dir", str(self.folder / "site")], cwd=ROOT,
                                  capture_output=True, text=True)
            assert done.returncode == 0, f"{command}:\n{done.stdout}{done.stderr}"
        elif command in PROCESSES:
            script = Path(sys.executable).with_name("vae")
            start = [str(script)] if script.exists() else [sys.executable, "-m", "vae_cli"]
            done = subprocess.run([*start, *command.split()[1:]], cwd=self.folder,
                                  capture_output=True, text=True)
            assert done.returncode == expect, done.stderr
            assert done.stdout.strip(), f"{command}: printed nothing"
        elif command.startswith("vae "):
            self.vae(command, expect)
        else:
            raise AssertionError(f"{command}: no way to run it here; mark its block")

    def vae(self, command: str, expect: int) -> None:
        command = self.placeholders(command)
        args = shlex.split(command)[1:]
        if fresh_train(command):
            self.count += 1
            run, sweep = self.folder / f"run{self.count}", self.folder / f"sweep{self.count}"
            if expect == 0:  # a refusal runs as shown; a run gets tiny sizes
                keys = dataset_keys(tuple(a for a in args if a.startswith(("dataset=",
                                                                             "experiment="))))
                sizes = {**TRAIN, **{f"dataset.{k}": v for k, v in DATA.items() if k in keys}}
                warmup = [a.split("=")[1] for a in args
                          if a.startswith("lr_scheduler.warmup_epochs=")]
                if warmup:  # a warm-up must end before the run does
                    sizes["trainer.epochs"] = str(int(float(warmup[0])) + 1)
                if "root" in keys:
                    sizes["dataset.root"] = str(self.data)
                args = with_sizes(args, sizes)
            if expect == 0 and tuple(args) in TRAINED:  # the same run: trained once
                self.run, self.shared = TRAINED[tuple(args)], True
                return
            code, err = run_vae([*args, f"hydra.run.dir={run}", f"hydra.sweep.dir={sweep}"],
                                self.folder)
            assert code == expect, f"{command}: exit {code}: {err[-800:]}"
            if code == 0 and run.is_dir():
                self.run, self.shared = run, True
                TRAINED[tuple(args)] = run
            elif code == 0:
                self.sweep = sweep
            return
        if resume(command.split()):  # one epoch more than the run has, where it names epochs
            more = f"trainer.epochs={epochs_done(self.run) + 1}"
            args = [more if a.startswith("trainer.epochs=") else a for a in args]
        sizes = {"eval": EVAL, "sample": SAMPLE}.get(args[0], {})
        sampler = [a.split("=", 1)[1] for a in args if a.startswith("sampler=")]
        sizes = {**sizes, **SAMPLERS.get(sampler[0] if sampler else "", {})}
        code, err = run_vae(with_sizes(args, sizes) if expect == 0 else args, self.folder)
        assert code == expect, f"{command}: exit {code}: {err[-800:]}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One data folder per test process: the offline data is made once and cached there."""
    return once("docs_data", lambda: tmp_path_factory.mktemp("docs-data"))


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, data_root):
    """A run for the commands that use one without training it first (export, eval), one
    per test process."""
    def train():
        reader = Reader(tmp_path_factory.mktemp("docs-run"), data_root, lambda: None)
        reader.type("vae train")
        return reader.run

    return once("docs_run", train)


@pytest.mark.parametrize("piece", pieces(), ids=str)
def test_documented_commands_run(piece, tmp_path, data_root, request):
    reader = Reader(tmp_path, data_root, lambda: request.getfixturevalue("shared_run"))
    for command in piece.commands:
        reader.type(command, piece.block.exit)
