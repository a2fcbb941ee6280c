"""The keep-alive helpers (flower_classifier.workspace) against a local HTTP server; each test takes
well under a second."""
import http.server
import socket
import threading
import time

import pytest

from flower_classifier import workspace
from flower_classifier.workspace import active_session, keep_awake

FAST = {"delay": 0.02, "interval": 0.02}


def keepalive_threads():
    return [t for t in threading.enumerate() if t.name == workspace.THREAD_NAME and t.is_alive()]


@pytest.fixture
def server():
    """A local endpoint that records the Authorization header of every POST it receives."""
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(self.headers.get("Authorization"))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):  # keep test output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/keep-alive", received
    httpd.shutdown()
    httpd.server_close()


def slow(items, seconds=0.03):
    for item in items:
        time.sleep(seconds)
        yield item


def test_without_endpoint_items_pass_through_silently(monkeypatch, capsys):
    monkeypatch.delenv(workspace.URL_VARIABLE, raising=False)
    items = ["a", {"b": 1}, None, 3]
    assert list(keep_awake(iter(items), **FAST)) == items
    with active_session(**FAST):
        assert not keepalive_threads()
    assert capsys.readouterr() == ("", "")
    assert not keepalive_threads()


def test_pings_with_token_while_looping_and_stops_after(monkeypatch, server, capsys):
    url, received = server
    monkeypatch.setenv(workspace.URL_VARIABLE, url)
    monkeypatch.setenv(workspace.TOKEN_VARIABLE, "secret")
    assert list(keep_awake(slow(range(8)), **FAST)) == list(range(8))
    assert not keepalive_threads()
    seen = len(received)
    assert seen >= 1 and set(received) == {"STAR secret"}
    time.sleep(0.15)
    assert len(received) == seen
    assert capsys.readouterr() == ("", "")


def test_thread_stops_on_break_and_on_exception(monkeypatch, server):
    url, received = server
    monkeypatch.setenv(workspace.URL_VARIABLE, url)
    monkeypatch.delenv(workspace.TOKEN_VARIABLE, raising=False)

    loop = keep_awake(slow(range(100)), **FAST)
    for i in loop:
        if i == 4:
            break
    loop.close()  # what CPython does at once when the loop's generator is dropped
    assert not keepalive_threads()

    with pytest.raises(ValueError):
        with active_session(**FAST):
            time.sleep(0.1)
            raise ValueError("the user's own error comes through unchanged")
    assert not keepalive_threads()
    assert received and set(received) == {None}  # no token: no Authorization header


def test_endpoint_down_does_not_raise(monkeypatch, capsys):
    with socket.socket() as s:  # a port that nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(workspace.URL_VARIABLE, f"http://127.0.0.1:{port}/keep-alive")
    assert list(keep_awake(slow(range(6)), **FAST)) == list(range(6))
    monkeypatch.setenv(workspace.URL_VARIABLE, "not a url")
    with active_session(**FAST):
        time.sleep(0.1)
    assert not keepalive_threads()
    assert capsys.readouterr() == ("", "")


def test_the_seed_file_keeps_its_names():
    import workspace_utils as seed

    assert seed.keep_awake is keep_awake and seed.active_session is active_session
    assert seed.URL_VARIABLE == workspace.URL_VARIABLE
