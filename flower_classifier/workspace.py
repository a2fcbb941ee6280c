"""Keep a hosted workspace from idling out during long runs (the Udacity project's helper API; the
top-level `workspace_utils.py` of the seed project imports it from here).

    with active_session():
        train_for_hours()

    for epoch in keep_awake(range(epochs)):
        train_one_epoch()

While either is active, a background thread POSTs to the URL in $WORKSPACE_KEEPALIVE_URL, first after
`delay` seconds and then every `interval` seconds, with the header `Authorization: STAR <token>` when
$WORKSPACE_KEEPALIVE_TOKEN is set. Without the URL (a laptop, a plain GPU box) both helpers only run
the wrapped code. A failed ping is ignored and retried at the next interval; it never breaks the loop.
The thread stops when the block or the loop ends, however it ends.
"""
from __future__ import annotations

import os
import threading
import urllib.request
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

URL_VARIABLE = "WORKSPACE_KEEPALIVE_URL"
TOKEN_VARIABLE = "WORKSPACE_KEEPALIVE_TOKEN"
DELAY = INTERVAL = 4 * 60  # seconds; well inside the usual 30-minute idle timeout
THREAD_NAME = "workspace-keepalive"
REQUEST_TIMEOUT = 10.0  # seconds; also the longest that leaving a block can wait for a ping in flight

T = TypeVar("T")


def _ping(url: str, token: str | None, timeout: float) -> None:
    headers = {"Authorization": f"STAR {token}"} if token else {}
    try:
        request = urllib.request.Request(url, data=b"", headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except Exception:  # a keep-alive must never disturb the work it is keeping alive
        pass


def _keep_pinging(stop: threading.Event, url: str, token: str | None, delay: float, interval: float) -> None:
    timeout = min(REQUEST_TIMEOUT, max(interval, 1.0))
    wait = delay
    while not stop.wait(wait):
        _ping(url, token, timeout)
        wait = interval


@contextmanager
def active_session(delay: float = DELAY, interval: float = INTERVAL) -> Iterator[None]:
    """Keep the workspace awake while the `with` block runs."""
    url = os.environ.get(URL_VARIABLE)
    if not url:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_keep_pinging, name=THREAD_NAME, daemon=True,
                              args=(stop, url, os.environ.get(TOKEN_VARIABLE), delay, interval))
    thread.start()
    try:
        yield
    finally:
        stop.set()
        # Waits at most for one ping in flight; the thread is a daemon, so it cannot block exit either.
        thread.join(REQUEST_TIMEOUT + 1)


def keep_awake(iterable: Iterable[T], delay: float = DELAY, interval: float = INTERVAL) -> Iterator[T]:
    """Yield the items of `iterable`, keeping the workspace awake until the loop ends or breaks."""
    with active_session(delay, interval):
        yield from iterable
