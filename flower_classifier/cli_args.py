"""What every command-line face shares: a parser that reports a bad option in one line, checked
number types and the common options."""
from __future__ import annotations

import argparse
import os

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line naming it, not a usage dump."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def number_type(kind, minimum=None, maximum=None, exclusive_min=False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if minimum is not None and (value <= minimum if exclusive_min else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if exclusive_min else '>='} {minimum} (got {text})")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum} (got {text})")
        return value
    parse.__name__ = kind.__name__
    return parse


positive_int = number_type(int, 1)
non_negative_int = number_type(int, 0)
positive_float = number_type(float, 0, exclusive_min=True)
non_negative_float = number_type(float, 0)


def add_workers_argument(p: argparse.ArgumentParser, what: str = "data-loading worker processes", **kw) -> None:
    p.add_argument("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1),
                   help=f"{what} (default: min(4, CPU count))", **kw)


def add_gpu_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", action="store_true", help="use CUDA or Apple MPS if present (default: CPU)")
