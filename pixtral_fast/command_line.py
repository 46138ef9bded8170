"""What every `pixtral-fast` subcommand shares, wherever it is registered from (cli.py, serve/,
quant/): the program's name, its exit codes and the argument parser with the one-line error format.
Standard library only, so that a subcommand's module imports it without importing cli.py (which
imports every subcommand)."""
from __future__ import annotations

import argparse

PROG = "pixtral-fast"
EXIT_BUG, EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 2, 130, 141


class Parser(argparse.ArgumentParser):
    """argparse with the one-line error format (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")
