"""What the commands with plain arguments (no Hydra app: compare, shard) share."""

from __future__ import annotations

import argparse

from vae_cli.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line through the dispatcher, not usage and exit."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")
