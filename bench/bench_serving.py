"""Load test of `serve` on loopback: 1, 8 and 32 clients each send the same photo to POST /predict,
back to back, for a fixed time; prints requests/s, p50 and p95 latency and errors per level. Then
the server's memory under large uploads: --large clients at once each send a 7000x7000 PNG (a small
file that decodes to 147 MB), then a 7000x7000 JPEG; prints the server's resident memory before,
its peak (VmHWM) and after each round, and the answers' status codes.

    python bench/bench_serving.py MODEL [--clients 1 8 32] [--seconds 10] [--photo tests/data/rose.jpg]
                                        [--large 10]

Starts the server itself (`python -m flower_classifier serve MODEL` on a free 127.0.0.1 port) and
stops it at the end. Traffic goes to 127.0.0.1 only, and stops after --seconds per level.
"""
from __future__ import annotations

import argparse
import io
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


def large_photos(side: int = 7000) -> dict[str, bytes]:
    """A PNG that compresses to a few hundred kB and a JPEG of a few MB, both side x side pixels."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rng = np.random.default_rng(0)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, -ramp) / 2 + 128,
                       np.full((side, side), 90, np.float32)], axis=-1).astype(np.uint8)  # (side, side, 3)
    photos = {}
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        image = Image.fromarray(pixels if fmt == "PNG" else
                                np.clip(pixels + rng.integers(-4, 5, pixels.shape), 0, 255).astype(np.uint8))
        image.save(buffer, format=fmt, **({"quality": 80} if fmt == "JPEG" else {"compress_level": 9}))
        photos[f"{side}x{side}.{fmt.lower()}"] = buffer.getvalue()
    return photos


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory now (VmRSS) and at its peak (VmHWM) of process `pid`, in MB (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:  # "5" resets VmHWM to the current VmRSS
        f.write("5")


def large_uploads(url: str, pid: int, clients: int) -> None:
    photos = large_photos()
    print(f"\nserver memory, {clients} uploads at once (MB):")
    print(f"{'upload':>16}{'file MB':>9}{'before':>8}{'peak':>8}{'after':>8}  answers")
    for name, data in photos.items():
        time.sleep(1)
        before = memory_mb(pid)["VmRSS"]
        reset_peak(pid)
        codes: list[int] = []

        def send():
            with httpx.Client(base_url=url, timeout=300) as http:
                codes.append(http.post("/predict", files={"file": (name, data, "image/*")}).status_code)

        threads = [threading.Thread(target=send) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(1)
        after = memory_mb(pid)
        print(f"{name:>16}{len(data) / 1e6:>9.2f}{before:>8.0f}{after['VmHWM']:>8.0f}{after['VmRSS']:>8.0f}  "
              f"{', '.join(f'{codes.count(c)}x {c}' for c in sorted(set(codes)))}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help=".onnx model or checkpoint to serve")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels (default: 1 8 32)")
    p.add_argument("--seconds", type=float, default=10, help="duration of each level (default: 10)")
    p.add_argument("--photo", default=str(ROOT / "tests/data/rose.jpg"), help="photo to send")
    p.add_argument("--parallel", type=int, default=1, help="the server's --parallel (default: 1)")
    p.add_argument("--large", type=int, default=10, help="large uploads sent at once to measure the server's "
                   "memory; 0 skips it (default: 10)")
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
        if args.large:
            large_uploads(url, server.pid, args.large)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
