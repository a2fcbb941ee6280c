"""Oxford 102 Flowers -> the project's layout OUT/{train,valid,test}/<category "1".."102">/image_NNNNN.jpg.

Long (about 440 lines) because it is one stage end to end: downloading through a .part file checked by MD5,
unpacking the archive safely, reading and checking the .mat label files, and laying the photos out;
splitting it would scatter one download's checks across modules that nothing else uses.

    prepare_oxford102(out_dir, *, source_dir=None, split="original", download=True, link=False,
                      progress=True) -> {"train": n, "valid": n, "test": n}

Source files (https://www.robots.ox.ac.uk/~vgg/data/flowers/102/): `102flowers.tgz` (jpg/image_00001.jpg
...), `imagelabels.mat` (category 1..102 of every image) and `setid.mat` (image ids of each split).
`source_dir` may hold them directly or be a torchvision `Flowers102` root, which keeps them (and the
unpacked `jpg/` folder) in `<root>/flowers-102/`. Files missing there are downloaded into it when
`download` is true; `source_dir` defaults to OUT/.oxford102-source, which is kept for later reruns.

Splits:
  original  setid.mat as published: train 1020 (10 per category), valid 1020, test 6149.
  classic   about 80/10/10 within every category (6552/818/819 in the Udacity course's copy). That
            course never published which image went where, so this is a fixed shuffle (same on every
            machine) with those proportions, not the course's exact split.

`link=True` hard-links the images of an unpacked `jpg/` folder instead of copying them (copies, and
says so, where the filesystem cannot link); with only the archive, images are extracted either way.

Only archive members named jpg/image_NNNNN.jpg that are plain files are read, and every output path
is built from the image id, so a crafted archive cannot write outside OUT. Each image is written to a
temporary name and renamed, and OUT/.oxford102.json records the split and whether the layout is
complete: an interrupted run can simply be rerun (finished images are kept), a rerun over a
complete layout does nothing, and `check-data` reports a layout left incomplete (`unfinished_download`).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import UserError
from .progress import progress_bar

BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
ARCHIVE, LABELS, SETID = "102flowers.tgz", "imagelabels.mat", "setid.mat"
# Only used to check files this module downloads; files handed in with --source are trusted.
MD5 = {
    ARCHIVE: "52808999861908f626f3c1f4e79d11fa",
    LABELS: "e0620be6f572b9609742df49c70aed4d",
    SETID: "a5357ecc9cb78c4bef273ce3793fc85c",
}
CATEGORIES = 102
SPLITS = ("train", "valid", "test")
SETID_KEYS = {"train": "trnid", "valid": "valid", "test": "tstid"}
SPLIT_CHOICES = ("original", "classic")
DEFAULT_SOURCE = ".oxford102-source"
STATE_FILE = ".oxford102.json"
TORCHVISION_SUBDIR = "flowers-102"
_MEMBER = re.compile(r"(?:\./)?jpg/image_(\d{5})\.jpg")
_MANUAL = (f"download {ARCHIVE}, {LABELS} and {SETID} from {BASE_URL} on a machine with internet, "
           f"copy them into one folder and pass it with --source DIR")


def prepare_oxford102(out_dir: str | Path, *, source_dir: str | Path | None = None,
                      split: str = "original", download: bool = True, link: bool = False,
                      progress: bool = True) -> dict[str, int]:
    """Build OUT/{train,valid,test}/<category>/ from the Oxford 102 files; returns images per split.

    Raises UserError for a bad option, a folder that already holds other data, unusable source files,
    or a failed download. `progress` shows status lines and progress bars on stderr.
    """
    if split not in SPLIT_CHOICES:
        raise UserError(f"unknown --split {split!r}; choose one of: {', '.join(SPLIT_CHOICES)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; give a folder for the Oxford 102 layout")
    say = _printer(progress)

    state = _read_state(out)
    _check_out_dir(out, state, split)
    if state and state.get("complete") and state.get("counts") == _count_images(out):
        say(f"{out} already holds the complete Oxford 102 layout ({_split_counts(state['counts'])}); "
            f"nothing to do")
        return state["counts"]

    if source_dir is not None:
        source = Path(source_dir)
        if not source.is_dir():
            raise UserError(f"--source {source}: {'is a file' if source.exists() else 'no such folder'}; pass "
                            f"the folder that holds {ARCHIVE}, {LABELS} and {SETID} (or a torchvision "
                            f"Flowers102 root)")
    else:
        source = out / DEFAULT_SOURCE
    found = _find_source(source)
    if found is None:
        if not download:
            raise UserError(_missing_files_message(source, given=source_dir is not None))
        _download_missing(source, say, progress)
        found = source
    labels, setids = _read_metadata(found)
    plan = _plan(labels, setids, split)
    if split == "classic":
        _warn_small_categories(labels)

    try:
        _write_state(out, {"split": split, "complete": False})
        jpg_dir = found / "jpg"
        if all((jpg_dir / _image_name(i)).is_file() for i in plan):
            say(f"{'linking' if link else 'copying'} {len(plan)} images from {jpg_dir} into {out}")
            _place_from_folder(jpg_dir, plan, out, link, progress)
        elif (found / ARCHIVE).is_file():
            if link:
                say(f"no unpacked jpg/ folder in {found}, so the images are extracted, not linked")
            say(f"extracting {len(plan)} images from {found / ARCHIVE} into {out}")
            _extract_archive(found / ARCHIVE, plan, out, progress)
        else:
            raise UserError(f"{jpg_dir}: lacks some of the {len(plan)} images and there is no {ARCHIVE} "
                            f"next to it; pass --source DIR with the complete files")
        counts = _count_images(out)
        expected = {s: sum(1 for where in plan.values() if where[0] == s) for s in SPLITS}
        if counts != expected:
            raise UserError(f"{out}: holds {_split_counts(counts)} images instead of {_split_counts(expected)}; "
                            f"remove the extra files, or delete {out} and run again")
        _write_state(out, {"split": split, "complete": True, "counts": counts})
    except OSError as e:
        raise UserError(f"{e.filename or out}: {e.strerror or e}; check free space and permissions, "
                        f"then run again (finished images are kept)") from e
    say(f"done: {out} holds {_split_counts(counts)} images")
    return counts


def _printer(enabled: bool):
    def say(message: str) -> None:
        if enabled:
            print(message, file=sys.stderr)
    return say


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)  # even with --quiet: the result is not what was asked


def _split_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts[s]} {s}" for s in SPLITS)


def _image_name(image_id: int) -> str:
    return f"image_{image_id:05d}.jpg"


# --- OUT folder state -----------------------------------------------------------------------------

def _read_state(out: Path) -> dict | None:
    path = out / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        if isinstance(state, dict) and state.get("split") in SPLIT_CHOICES:
            return state
    except (OSError, ValueError):
        pass
    raise UserError(f"{path}: unreadable; delete {out} and run again")


def unfinished_download(data_dir: str | Path) -> str | None:
    """Why DATA is not a finished Oxford 102 layout, when this module's marker file says so (or is
    damaged); None for a finished layout and for any folder this module did not make."""
    data_dir = Path(data_dir)
    try:
        state = _read_state(data_dir)
    except UserError as e:
        return str(e)
    if state is None or state.get("complete"):
        return None
    return (f"{data_dir / STATE_FILE} says the Oxford 102 download into {data_dir} did not finish: run "
            f"`python -m flower_classifier download {data_dir} --split {state['split']}` again (finished "
            f"images are kept)")


def _write_state(out: Path, state: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    part = out / f"{STATE_FILE}.part"
    part.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(part, out / STATE_FILE)


def _check_out_dir(out: Path, state: dict | None, split: str) -> None:
    """Refuse to mix our images into data this module did not make, or into another split's layout."""
    if state is None:
        for s in SPLITS:
            if (out / s).is_dir() and any((out / s).iterdir()):
                raise UserError(f"{out / s}: already holds files that this command did not make; "
                                f"choose a new or empty folder")
    elif state["split"] != split:
        raise UserError(f"{out}: holds (part of) the Oxford 102 layout with --split {state['split']}; "
                        f"use that, another folder, or delete {out} to rebuild it")


def _count_images(out: Path) -> dict[str, int]:
    counts = {}
    for s in SPLITS:
        split_dir = out / s
        categories = [d for d in split_dir.iterdir() if d.is_dir()] if split_dir.is_dir() else []
        counts[s] = sum(1 for d in categories for f in d.iterdir() if f.suffix == ".jpg"
                        and not f.name.startswith("."))
    return counts


# --- source files ---------------------------------------------------------------------------------

def _find_source(directory: Path) -> Path | None:
    """The folder holding the three files: DIR itself or a torchvision root's DIR/flowers-102."""
    for d in (directory, directory / TORCHVISION_SUBDIR):
        if (d / LABELS).is_file() and (d / SETID).is_file() and (
                (d / ARCHIVE).is_file() or (d / "jpg").is_dir()):
            return d
    return None


def _missing_files_message(source: Path, *, given: bool) -> str:
    """What to do when the three files are not all in SOURCE and downloading is not allowed."""
    best = max((source, source / TORCHVISION_SUBDIR), key=lambda d: len(_source_files(d)))
    have = _source_files(best)
    if not have and not given:
        urls = ", ".join(BASE_URL + name for name in (ARCHIVE, LABELS, SETID))
        return (f"--no_download needs the Oxford 102 files: download {urls} on a machine with internet, put "
                f"them in one folder and pass it with --source DIR (or drop --no_download)")
    lacking = [n for n in (ARCHIVE, LABELS, SETID) if n not in have and not (n == ARCHIVE and "jpg/" in have)]
    if not have:
        return (f"--source {source}: holds none of {ARCHIVE}, {LABELS} and {SETID} (nor a torchvision "
                f"Flowers102 root); {_MANUAL}, or drop --no_download")
    # Named in the folder that holds most of the files (DIR or a torchvision root's DIR/flowers-102).
    return (f"{'--source ' if given else ''}{best}: lacks {' and '.join(lacking)}; get "
            f"{'it' if len(lacking) == 1 else 'them'} from {BASE_URL} into {best}, or drop --no_download")


def _source_files(directory: Path) -> set[str]:
    names = {n for n in (ARCHIVE, LABELS, SETID) if (directory / n).is_file()}
    return names | ({"jpg/"} if (directory / "jpg").is_dir() else set())


def _download_missing(directory: Path, say, progress: bool) -> None:
    # Small files first, so that an offline machine fails at once rather than after a long wait.
    for name in (LABELS, SETID, ARCHIVE):
        dest = directory / name
        if dest.is_file():
            continue
        say(f"downloading {BASE_URL}{name} into {directory}")
        _download(BASE_URL + name, dest, progress)


def _download(url: str, dest: Path, progress: bool) -> None:
    """Stream url to DEST.part and rename it once complete and verified, so DEST is never partial."""
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f, \
                progress_bar(total=int(response.headers.get("Content-Length") or 0) or None, desc=dest.name,
                             unit="B", unit_scale=True, enabled=progress) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise UserError(f"could not download {url}: the server answered HTTP {e.code} {e.reason}; "
                        f"{_MANUAL}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"could not download {url} ({reason}); this machine seems to be offline: "
                        f"{_MANUAL}") from None
    except OSError as e:
        raise UserError(f"{e.filename or part}: could not save the download ({e.strerror or e}); "
                        f"check free space and permissions") from None
    expected = MD5.get(dest.name)
    if expected and _md5(part) != expected:
        part.unlink()
        raise UserError(f"the download of {url} is damaged (checksum mismatch); run again, or {_MANUAL}")
    os.replace(part, dest)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_metadata(source: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Category per image (labels[i] for image id i+1) and the 1-based image ids of each split."""
    from scipy.io import loadmat  # here: check-data reads this module's marker without needing scipy
    from scipy.io.matlab import MatReadError

    path = source / LABELS
    try:
        raw_labels = loadmat(path)["labels"].ravel()
        path = source / SETID
        setid = loadmat(path)
        raw_ids = {s: setid[key].ravel() for s, key in SETID_KEYS.items()}
        if not _whole(raw_labels):
            raise UserError(f"{source / LABELS}: categories must be whole numbers from 1 to {CATEGORIES}; "
                            f"get a fresh copy from {BASE_URL}")
        if not all(_whole(ids) for ids in raw_ids.values()):
            raise UserError(f"{source / SETID}: image ids must be whole numbers; get a fresh copy from {BASE_URL}")
        labels = raw_labels.astype(int)
        setids = {s: ids.astype(int) for s, ids in raw_ids.items()}
    except (OSError, KeyError, ValueError, TypeError, MatReadError) as e:
        raise UserError(f"{path}: not the Oxford 102 file ({type(e).__name__}: {e}); "
                        f"get a fresh copy from {BASE_URL}") from None
    if labels.size == 0 or labels.min() < 1 or labels.max() > CATEGORIES:
        raise UserError(f"{source / LABELS}: categories must be whole numbers from 1 to {CATEGORIES} (found "
                        f"{labels.min() if labels.size else 'none'}..{labels.max() if labels.size else ''}); "
                        f"get a fresh copy from {BASE_URL}")
    ids = np.concatenate(list(setids.values()))
    if ids.size and (ids.min() < 1 or ids.max() > labels.size or np.unique(ids).size != ids.size):
        raise UserError(f"{source / SETID}: image ids out of range or repeated across splits; "
                        f"get a fresh copy from {BASE_URL}")
    return labels, setids


def _whole(numbers: np.ndarray) -> bool:
    """Integers, or floats (MATLAB stores doubles) that are all finite whole numbers."""
    if numbers.dtype.kind in "iu":
        return True
    return numbers.dtype.kind == "f" and bool(np.all(np.isfinite(numbers) & (numbers == np.round(numbers))))


def _held_out(size: int) -> int:
    """--split classic: how many of a category's `size` images go to valid, and as many to test."""
    return (size + 5) // 10  # a tenth, rounded half up: none for a category of fewer than 5


def _plan(labels: np.ndarray, setids: dict[str, np.ndarray], split: str) -> dict[int, tuple[str, str]]:
    """image id -> (split, category folder name)."""
    if split == "original":
        return {int(i): (s, str(labels[i - 1])) for s, ids in setids.items() for i in ids}
    by_category = defaultdict(list)
    for image_id, category in enumerate(labels.tolist(), start=1):
        by_category[category].append(image_id)
    rng = random.Random(102)  # int seed: the same shuffle on every machine and Python version
    plan = {}
    for category in sorted(by_category):
        ids = by_category[category]
        rng.shuffle(ids)
        tenth = _held_out(len(ids))
        for n, image_id in enumerate(ids):
            s = "valid" if n < tenth else "test" if n < 2 * tenth else "train"
            plan[image_id] = (s, str(category))
    return plan


def _warn_small_categories(labels: np.ndarray) -> None:
    """--split classic gives a category of fewer than 5 images no valid or test image: say which."""
    numbers, sizes = np.unique(labels, return_counts=True)
    small = [(int(c), int(n)) for c, n in zip(numbers, sizes) if _held_out(int(n)) == 0]
    if small:
        shown = ", ".join(f"{c} ({n})" for c, n in small[:5])
        shown += f" and {len(small) - 5} more" if len(small) > 5 else ""
        _warn(f"--split classic: {len(small)} {'category has' if len(small) == 1 else 'categories have'} fewer "
              f"than 5 images, too few for a valid or test image, so they are in train only: "
              f"{shown} (category (images))")


# --- writing images -------------------------------------------------------------------------------

def _destination(out: Path, where: tuple[str, str], image_id: int) -> Path:
    return out / where[0] / where[1] / _image_name(image_id)


def _is_done(dest: Path, size: int) -> bool:
    try:
        return dest.stat().st_size == size
    except FileNotFoundError:
        return False


def _temp_name(dest: Path) -> Path:
    # Hidden and not .jpg, so a leftover from an interrupted run is never taken for an image.
    return dest.with_name(f".{dest.name}.part")


def _place_from_folder(jpg_dir: Path, plan: dict[int, tuple[str, str]], out: Path, link: bool,
                       progress: bool) -> None:
    with progress_bar(total=len(plan), desc="images", unit="it", enabled=progress) as bar:
        for image_id, where in sorted(plan.items()):
            src, dest = jpg_dir / _image_name(image_id), _destination(out, where, image_id)
            if not _is_done(dest, src.stat().st_size):
                dest.parent.mkdir(parents=True, exist_ok=True)
                part = _temp_name(dest)
                part.unlink(missing_ok=True)
                if link:
                    try:
                        os.link(src, part)
                    except OSError as e:  # another filesystem, or one without hard links
                        _warn(f"--link: cannot hard-link {src} into {out} ({e.strerror or e}; another "
                              f"filesystem?), so the images are copied instead (they take space twice)")
                        link = False
                if not link:
                    shutil.copyfile(src, part)
                os.replace(part, dest)
            bar.update(1)


def _extract_archive(archive: Path, plan: dict[int, tuple[str, str]], out: Path, progress: bool) -> None:
    found = set()
    try:
        # Stream mode reads the .tgz once front to back, which is all a gzip file allows cheaply.
        with tarfile.open(archive, "r|*") as tar, \
                progress_bar(total=len(plan), desc="images", unit="it", enabled=progress) as bar:
            for member in tar:
                match = _MEMBER.fullmatch(member.name)
                if not (match and member.isfile()):
                    continue  # anything else (links, "../" names, other files) is never written
                image_id = int(match.group(1))
                if image_id not in plan or image_id in found:
                    continue
                dest = _destination(out, plan[image_id], image_id)
                if not _is_done(dest, member.size):
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    part = _temp_name(dest)
                    with tar.extractfile(member) as src, open(part, "wb") as f:
                        shutil.copyfileobj(src, f)
                    os.replace(part, dest)
                found.add(image_id)
                bar.update(1)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise UserError(f"{archive}: not a readable archive ({e}); get a fresh copy from {BASE_URL}") from None
    missing = sorted(set(plan) - found)
    if missing:
        raise UserError(f"{archive}: lacks {len(missing)} of the {len(plan)} images (first: "
                        f"{_image_name(missing[0])}); get a fresh copy from {BASE_URL}")
