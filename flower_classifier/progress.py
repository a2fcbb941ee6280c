"""Progress bars, one kind everywhere: on stderr (stdout stays for results), gone when finished,
and off when the caller says so (--quiet, or a process other than torchrun's first)."""
from __future__ import annotations

import sys

from tqdm import tqdm  # not tqdm.auto: its asyncio class calls iter() on a DataLoader twice (double work)


def progress_bar(iterable=None, *, desc: str, unit: str, enabled: bool = True, leave: bool = False,
                 **options) -> tqdm:
    return tqdm(iterable, desc=desc, unit=unit, leave=leave, disable=not enabled, file=sys.stderr, **options)
