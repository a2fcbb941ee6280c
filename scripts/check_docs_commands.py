#!/usr/bin/env python3
"""Runs the commands that README.md and docs/*.md show, as a reader would type them, and fails if
one exits non-zero.

A command is a line of a fenced ```bash block, or a `$ ` line of any fenced block (its output lines
are not checked). They run in page order (README first, then docs/ pages in the README's order), in
a scratch copy of the repository laid out as a fresh clone: `.venv` there points at this
environment, and `../shared` at the shared data (--shared), so that `../shared/data/...` paths work
as written. Commands that need internet, a GPU, a data folder this machine lacks, a placeholder
filled in, or a long or interactive run are skipped, each with its reason, listed at the end.
`serve` starts in the background (on a free port instead of 8000, which curl commands follow) and
stops at the end of its page. Where a page shows a command's output, the lines it shows that the
real run did not print are listed at the end as notes (numbers move from run to run; read them).

    .venv/bin/python scripts/check_docs_commands.py --shared ../shared          # run what can run
    .venv/bin/python scripts/check_docs_commands.py --list                      # only say what would run
    .venv/bin/python scripts/check_docs_commands.py --only 'predict|export'     # a subset (regex)

Exit status: 0 when every command that ran exited 0, 1 when one failed, 2 on a usage mistake.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
DOCS_PORT = "8000"  # the port the pages show; serve and curl are moved to a free one
# Backbones whose weights come with the project (pip packages) or are random: no download needed.
OFFLINE_ARCHS = {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "tiny"}
# Words the pages use for "put your own here".
PLACEHOLDERS = re.compile(r"(?<![\w/.-])(DIR|DATA|DATA_DIR|CHECKPOINT|PHOTO|FILE|IMAGE|MODEL|OUT|HOST:PORT|"
                          r"photo\.jpg|photo_of_a_cat\.jpg|names\.json|photos)(?![\w-])|\.\.\.")


@dataclass
class Command:
    page: str  # path relative to the repository
    line: int  # line number of the command's first line
    text: str  # as shown, continuation lines joined
    shown: tuple[str, ...] = ()  # the output a session block shows after it


def pages(root: Path = ROOT) -> list[Path]:
    """README.md, then the docs/ pages in the order the README links them, then any others."""
    readme = root / "README.md"
    linked = [root / m for m in re.findall(r"\]\((docs/[\w.-]+\.md)", readme.read_text(encoding="utf-8"))]
    docs = sorted((root / "docs").glob("*.md"))
    ordered = [p for p in dict.fromkeys(linked) if p in docs] + [p for p in docs if p not in linked]
    return [readme, *ordered]


def extract(text: str, page: str = "") -> list[Command]:
    """The commands of a page's fenced blocks: every line of a shell block (comments and blank lines
    left out), or, in a block that shows a session, the `$ ` lines alone; a line ending in `\\`
    continues on the next."""
    commands: list[Command] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, language = opening.group(1), opening.group(2).lower()
        body_start = i + 1
        j = body_start
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        body = lines[body_start:j]
        session = any(line.startswith("$ ") for line in body)
        if session or language in SHELL_LANGUAGES:
            k = 0
            while k < len(body):
                line = body[k]
                start = k
                if session:
                    if not line.startswith("$ "):
                        k += 1
                        continue
                    line = line[2:]
                elif not line.strip() or line.lstrip().startswith("#"):
                    k += 1
                    continue
                parts = [line.rstrip()]
                while parts[-1].endswith("\\") and k + 1 < len(body):
                    k += 1
                    parts[-1] = parts[-1][:-1].rstrip()
                    parts.append(body[k].strip())
                shown = []
                while session and k + 1 < len(body) and not body[k + 1].startswith("$ "):
                    k += 1
                    shown.append(body[k])
                commands.append(Command(page, body_start + start + 1, " ".join(parts).strip(), tuple(shown)))
                k += 1
        i = j + 1
    return commands


def without_comment(cmd: str) -> str:
    """The command without its trailing shell comment (` # ...`)."""
    return cmd.split(" #", 1)[0].rstrip()


def skip_reason(cmd: str, *, shared: bool, long_runs: bool) -> str | None:
    """Why a command is not run here, or None to run it (a curl runs only while `serve` runs: main decides)."""
    code = without_comment(cmd)  # the shell comment, if any, says nothing about what runs
    words = code.split()
    if not words:
        return "empty"
    if re.search(r"(^|\s|/)(setup\.sh|run_tests\.sh)\b", code) and "&&" not in code:
        return "installs or runs the whole test suite: run it yourself"
    if "--gpu" in words:
        return "needs a GPU"
    if "pip install" in code or "pip3 install" in code:
        return "installs packages (internet)"
    if re.search(r"\bdownload\b", code) and "-m flower_classifier" in code and "--no_download" not in words:
        return "downloads Oxford 102 (internet)"
    if re.search(r"\b(jupyter (notebook|lab)|tensorboard)\b", code):
        return "interactive: opens a program that keeps running"
    notebook = "flower_classifier.notebook" in code
    if PLACEHOLDERS.search(re.sub(r"-p\s+\w+", "", code)):  # a notebook knob's name is no placeholder
        return "has a placeholder to fill in"
    if re.search(r"(^|\s)(\S*/)?flowers(_\w+)?(/|\s|$)", code) or (notebook and "DATA_DIR" not in code):
        return "needs Oxford 102 in flowers/ (python -m flower_classifier download flowers)"
    if "../shared" in code and not shared:
        return "needs ../shared/data (pass --shared DIR)"
    if (re.search(r"\b(train\.py|search|torchrun)\b", code) or notebook) and "--help" not in words:
        arch = re.search(r"(?:--arch[ =]|-p\s+ARCH\s+)(\S+)", code)
        if (arch.group(1) if arch else "vgg16") not in OFFLINE_ARCHS:
            return f"downloads the {arch.group(1) if arch else 'default vgg16'} weights (internet); offline: --arch efficientnet_lite0"
    if not long_runs and "--write_halves" not in words and (
            re.search(r"(^|\s)(\S*/)?(bench/\S+\.py|make_assets\.sh)\b", code)
                          or re.search(r"--trials\s+([2-9]\d|\d{3,})", code)):
        return "long run (minutes to an hour): pass --long to run it"
    return None


def last_lines(output: str, n: int = 6) -> list[str]:
    """The last n lines a reader would see: progress bars' redrawn lines and blank lines left out."""
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in output.splitlines()]
    return [line for line in lines if line.strip() and not re.search(r"\|\s*[\d/?]+ \[.*(it|batch)/s", line)][-n:]


def differing_lines(shown: tuple[str, ...], output: str) -> list[str]:
    """The shown output lines that the real output lacks (spacing aside; lines cut with '...' left out)."""
    def norm(line: str) -> str:
        return " ".join(line.split())
    real = {norm(line.rsplit("\r", 1)[-1]) for line in output.splitlines()}
    return [line for line in shown if line.strip() and "..." not in line and norm(line) not in real]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_copy(root: Path, shared: Path | None, venv: Path) -> Path:
    """A fresh clone's layout in a temporary folder: tracked and new (not ignored) files, .venv and ../shared."""
    base = Path(tempfile.mkdtemp(prefix="check_docs_"))
    repo = base / "repo"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = root / name
        if src.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    (repo / "checkpoints").mkdir(exist_ok=True)
    (repo / ".venv").symlink_to(venv)
    if shared is not None:
        (base / "shared").symlink_to(shared.resolve())
    return repo


class Server:
    """A `serve` command run in the background until its page ends."""

    def __init__(self, cmd: str, repo: Path, env: dict, port: int):
        self.port = port
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=repo, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return True
            except OSError:
                time.sleep(1)
        return False

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared",
                   help="the folder the pages call ../shared (holding data/flower_photos_sample) (default: ../shared)")
    p.add_argument("--venv", type=Path, default=Path(sys.prefix),
                   help="the environment the pages call .venv (default: the one running this script)")
    p.add_argument("--only", metavar="REGEX", help="run only commands matching REGEX (others are listed as skipped)")
    p.add_argument("--long", action="store_true", help="also run the benchmarks and other long runs")
    p.add_argument("--list", action="store_true", help="say what would run and what would be skipped; run nothing")
    p.add_argument("--timeout", type=float, default=900, help="seconds one command may take (default: 900)")
    p.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = p.parse_args(argv)
    shared = args.shared if (args.shared / "data").is_dir() else None
    if shared is None:
        print(f"note: {args.shared}/data not found: commands on ../shared/data are skipped (pass --shared DIR)")

    plan: list[tuple[Command, str | None]] = []
    for page in pages():
        for c in extract(page.read_text(encoding="utf-8"), str(page.relative_to(ROOT))):
            reason = skip_reason(c.text, shared=shared is not None, long_runs=args.long)
            if reason is None and args.only and not re.search(args.only, c.text):
                reason = "not matched by --only"
            plan.append((c, reason))
    if args.list:
        for c, reason in plan:
            print(f"{'skip' if reason else 'run '}  {c.page}:{c.line}  {c.text}" + (f"\n      ({reason})" if reason else ""))
        return 0

    repo = scratch_copy(ROOT, shared, args.venv)
    print(f"scratch copy: {repo}")
    env = dict(os.environ, PYTHONPATH=str(repo), PATH=f"{repo / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env.pop("VIRTUAL_ENV", None)
    port = str(free_port())
    server: Server | None = None
    page_of_server = None
    failed, skipped, notes, ran = [], [], [], 0
    try:
        for c, reason in plan:
            if server and c.page != page_of_server:
                server.stop()
                server = None
            text = c.text.replace(f":{DOCS_PORT}", f":{port}")
            if text.startswith("./setup.sh && "):  # the environment is this one: set up already
                text = text[len("./setup.sh && "):]
            if reason is None and text.split()[0] == "curl" and server is None:
                reason = "needs `serve` running"
            where = f"{c.page}:{c.line}"
            if reason:
                skipped.append((c, reason))
                continue
            print(f"\n$ {c.text}    [{where}]", flush=True)
            if re.search(r"flower_classifier serve\b", text):
                if server:
                    server.stop()
                text = without_comment(text)  # so that --port is not appended to the comment
                server = Server(f"{text} --port {port}" if "--port" not in text else text, repo, env, int(port))
                page_of_server = c.page
                ran += 1
                if server.wait_ready(min(args.timeout, 300)):
                    print(f"ok: serving on port {port}")
                else:
                    failed.append((c, "the server did not answer /health:\n" + server.output()[-2000:]))
                    server.stop()
                    server = None
                continue
            start = time.monotonic()
            try:
                done = subprocess.run(["bash", "-c", text], cwd=repo, env=env, capture_output=True, text=True,
                                      timeout=args.timeout)
                output, rc = done.stdout + done.stderr, done.returncode
            except subprocess.TimeoutExpired as timeout:
                output, rc = str(timeout.stdout or "") + str(timeout.stderr or ""), "timeout"
            ran += 1
            seconds = time.monotonic() - start
            tail = "\n".join(last_lines(output))
            if rc == 0:
                print(f"ok ({seconds:.1f} s)\n{tail}")
                differ = differing_lines(c.shown, output)
                if differ:  # numbers move from run to run: a note to read, not a failure
                    notes.append((c, differ))
                    print(f"note: {len(differ)} of the {len(c.shown)} output lines shown differ")
            else:
                print(f"FAILED (exit {rc}, {seconds:.1f} s)\n{tail}")
                failed.append((c, f"exit {rc}: {tail}"))
    finally:
        if server:
            server.stop()
        if not args.keep:
            shutil.rmtree(repo.parent, ignore_errors=True)

    print(f"\n{ran} commands ran, {len(failed)} failed, {len(skipped)} skipped:")
    for c, reason in skipped:
        print(f"  skipped  {c.page}:{c.line}  {c.text[:100]}\n           ({reason})")
    for c, differ in notes:
        print(f"  differs  {c.page}:{c.line}  {c.text[:100]}\n           shown but not printed now: "
              + " | ".join(line.strip() for line in differ[:4]) + (" | ..." if len(differ) > 4 else ""))
    for c, why in failed:
        print(f"  FAILED   {c.page}:{c.line}  {c.text}\n           {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
