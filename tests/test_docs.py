"""The README front page and the docs/ pages: every relative link and #anchor resolves, every page
is reachable from the README, and the front page stays short. Offline, reads only the repository."""
import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRONT_PAGE_MAX_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target), optionally with a "title"; <img src="..."> for sized pictures
MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.IGNORECASE)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks, where headings and links live."""
    fenced = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match:
            if fenced is None:
                fenced = match.group(1)
            elif line.strip().startswith(fenced):
                fenced = None
            continue
        if fenced is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and link targets dropped, lower case, punctuation other
    than '-' and '_' removed, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a page offers, duplicates numbered -1, -2, ... as GitHub does."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path):
    """(line number, target) of every link and picture in a page's prose (not in code)."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub("", line)
        for pattern in (MD_LINK, HTML_SRC):
            for match in pattern.finditer(line):
                yield number, match.group(1)


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE))


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for number, target in links(path):
        if is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {os.path.relpath(dest, root)}")
    return problems


def test_slug_follows_githubs_rules():
    assert slug("Set up") == "set-up"
    assert slug("`predict.py IMAGE [IMAGE ...] CHECKPOINT`") == "predictpy-image-image--checkpoint"
    assert slug("Several GPUs (torchrun)") == "several-gpus-torchrun"
    assert slug("Figures (2-core CPU, shared)") == "figures-2-core-cpu-shared"
    assert slug("`python -m flower_classifier COMMAND`") == "python--m-flower_classifier-command"


def test_anchors_number_duplicates_and_ignore_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Notes\n\n```bash\n# not a heading\n```\n\n## Notes\n")
    assert anchors(page) == {"title", "notes", "notes-1"}


def test_checker_finds_a_broken_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#other) [gone](missing.md) [bad](other.md#nowhere) `[code](x.md)`\n"
                    "[web](https://example.com) [self](#page)\n\n# Page\n")
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 2
    assert "missing.md: no such file" in problems[0] and "#nowhere" in problems[1]


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for _, target in links(ROOT / "README.md")
              if not is_external(target)}
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ holds no pages"
    assert [p.name for p in pages if p.resolve() not in linked] == []


def test_readme_front_page_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= FRONT_PAGE_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_no_issue_numbers_in_user_facing_text():
    pattern = re.compile(r"\bissues? \d+\b|(?<![\w&/])#\d+\b", re.IGNORECASE)
    found = [f"{page.relative_to(ROOT)}:{n}: {line.strip()}" for page in doc_pages()
             for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert found == []


# scripts/check_docs_commands.py runs the pages' commands (minutes: not in the suite); here, that it
# finds them, and that every entry point the pages name answers --help.
@functools.cache
def load_checker():
    spec = importlib.util.spec_from_file_location("check_docs_commands", ROOT / "scripts" / "check_docs_commands.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_checker_extracts_shell_lines_and_session_commands():
    checker = load_checker()
    page = ("text\n```bash\n# a comment\npython train.py data \\\n    --epochs 2   # why\n\nls\n```\n"
            "```\n$ python predict.py a.jpg m.pth\nTop 5 for a.jpg:\n  1. daisy\n```\n"
            "```\nflowers/\n  train/\n```\n```python\nimport flower_classifier\n```\n")
    found = [(c.line, c.text) for c in checker.extract(page, "p.md")]
    assert found == [(4, "python train.py data --epochs 2   # why"), (7, "ls"),
                     (10, "python predict.py a.jpg m.pth")]


def test_checker_notes_shown_output_that_a_run_no_longer_prints():
    checker = load_checker()
    (command,) = checker.extract("```\n$ python predict.py a.jpg m.pth\nTop 1 for a.jpg:\n  1. daisy   81.33%\n"
                                 "...\n```\n", "p.md")
    assert command.shown == ("Top 1 for a.jpg:", "  1. daisy   81.33%", "...")
    assert checker.differing_lines(command.shown, "Top 1 for a.jpg:\n  1. daisy 81.33%\n") == []
    assert checker.differing_lines(command.shown, "Top 1 for a.jpg:\n  1. rose 50.00%\n") == ["  1. daisy   81.33%"]


def test_checker_drops_a_trailing_comment_but_not_a_url():
    checker = load_checker()
    assert checker.without_comment("python -m flower_classifier serve model.onnx   # or a .pth") == \
        "python -m flower_classifier serve model.onnx"
    assert checker.without_comment("curl 'http://127.0.0.1:8000/predict#x'") == "curl 'http://127.0.0.1:8000/predict#x'"


@pytest.mark.parametrize("command, reason", [
    ("python train.py ../shared/data/flower_photos_sample --arch efficientnet_lite0", None),
    ("python train.py ../shared/data/flower_photos_sample", "internet"),
    ("python train.py flowers --arch efficientnet_lite0", "Oxford 102"),
    ("torchrun --nproc_per_node 4 train.py x --gpu --arch vgg16", "GPU"),
    ("python predict.py photo.jpg model.onnx", "placeholder"),
    ("python -m flower_classifier download flowers", "internet"),
    ("python bench/bench_training.py ../shared/data/flower_photos_sample", "long run"),
    ("python -m flower_classifier.notebook N.ipynb -p DATA_DIR ../shared/data/s -p ARCH efficientnet_lite0", None),
    ("python -m flower_classifier.notebook N.ipynb -p DATA_DIR ../shared/data/s -p ARCH densenet121", "internet"),
    ("./run_tests.sh", "test suite"),
])
def test_checker_says_why_it_skips_a_command(command, reason):
    found = load_checker().skip_reason(command, shared=True, long_runs=False)
    assert (found is None) if reason is None else (reason in found), found


def test_every_documented_command_is_seen_by_the_checker():
    checker = load_checker()
    commands = [c for page in checker.pages(ROOT) for c in
                checker.extract(page.read_text(encoding="utf-8"), page.name)]
    assert any("train.py" in c.text for c in commands) and any("serve" in c.text for c in commands)
    readme = [c for c in commands if c.page == "README.md"]
    runnable = [c for c in readme if checker.skip_reason(c.text, shared=True, long_runs=False) is None]
    assert len(runnable) >= 8, "the README's try-it commands should all be runnable on the sample"


def entry_points() -> list[str]:
    """Each program the pages run, with its subcommand: `train.py`, `python -m flower_classifier evaluate`, ..."""
    checker = load_checker()
    found = set()
    for page in checker.pages(ROOT):
        for c in checker.extract(page.read_text(encoding="utf-8"), page.name):
            code = c.text.split(" #", 1)[0]
            for match in re.finditer(r"\b(train\.py|predict\.py)\b", code):
                found.add(match.group(1))
            for match in re.finditer(r"-m (flower_classifier(?:\.notebook)?)(?: ([a-z][\w-]*))?", code):
                module, sub = match.groups()
                found.add(f"-m {module} {sub}" if module == "flower_classifier" and sub else f"-m {module}")
    return sorted(found)


def test_every_entry_point_the_pages_run_answers_help():
    points = entry_points()
    assert "train.py" in points and "-m flower_classifier serve" in points
    failed = []
    for point in points:
        done = subprocess.run([sys.executable, *point.split(), "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0 or "usage" not in done.stdout.lower():
            failed.append(f"{point} --help: exit {done.returncode}: {done.stderr.strip()[-300:]}")
    assert failed == []
