"""Load test of `serve` on loopback: 1, 8 and 32 clients each send the same photo to POST /predict,
back to back, for a fixed time; prints requests/s, p50 and p95 latency and errors per level.

    python bench/bench_serving.py MODEL [--clients 1 8 32] [--seconds 10] [--photo tests/data/rose.jpg]

Starts the server itself (`python -m flower_classifier serve MODEL` on a free 127.0.0.1 port) and
stops it at the end. Traffic goes to 127.0.0.1 only, and stops after --seconds per level.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MAX_REQUESTS_PER_CLIENT = 100_000  # a bound besides the time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}): {server.stderr.read().decode()[-500:]}")
        try:
            return httpx.get(f"{url}/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the server did not start in time")


def load(url: str, photo: bytes, clients: int, seconds: float) -> tuple[list[float], int]:
    """Latencies (ms) of the successful requests, and the number of failed ones."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client():
        nonlocal errors
        mine, failed = [], 0
        with httpx.Client(base_url=url, timeout=60) as http:
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if time.monotonic() >= deadline:
                    break
                start = time.perf_counter()
                try:
                    ok = http.post("/predict", files={"file": ("photo.jpg", photo, "image/jpeg")}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    mine.append(1000 * (time.perf_counter() - start))
                else:
                    failed += 1
        with lock:
            latencies.extend(mine)
            errors += failed

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help=".onnx model or checkpoint to serve")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels (default: 1 8 32)")
    p.add_argument("--seconds", type=float, default=10, help="duration of each level (default: 10)")
    p.add_argument("--photo", default=str(ROOT / "tests/data/rose.jpg"), help="photo to send")
    p.add_argument("--parallel", type=int, default=1, help="the server's --parallel (default: 1)")
    args = p.parse_args(argv)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "flower_classifier", "serve", args.model, "--port", str(port),
                               "--parallel", str(args.parallel)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        info = wait_until_up(url, server)
        photo = Path(args.photo).read_bytes()
        load(url, photo, 1, 2)  # warm up
        print(f"{info['backend']} {info['arch']}, --parallel {args.parallel}; {os.cpu_count()} CPUs shared by "
              f"server and clients; {args.seconds:g} s per level; photo {args.photo} ({len(photo) / 1e3:.0f} kB)")
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        print(f"{'clients':>7}{'requests':>10}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'errors':>8}")
        for clients in args.clients:
            latencies, errors = load(url, photo, clients, args.seconds)
            n = len(latencies)
            p50 = statistics.median(latencies) if n else float("nan")
            p95 = sorted(latencies)[min(n - 1, int(0.95 * n))] if n else float("nan")
            print(f"{clients:>7}{n:>10}{n / args.seconds:>8.1f}{p50:>9.0f}{p95:>9.0f}{errors:>8}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
