"""prepare_oxford102 on a tiny fake copy of the Oxford 102 files; never touches the network."""
import hashlib
import io
import json
import os
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from flower_classifier import oxford102
from flower_classifier.errors import UserError
from flower_classifier.oxford102 import prepare_oxford102

# Image id i (1-based) has category LABELS[i - 1]; setid.mat puts 1,2 in train, 3,4 in valid, 5,6 in test.
LABELS = [1, 2, 1, 2, 102, 1]
SETID = {"trnid": [1, 2], "valid": [3, 4], "tstid": [5, 6]}
EXPECTED = {
    "train/1/image_00001.jpg", "train/2/image_00002.jpg",
    "valid/1/image_00003.jpg", "valid/2/image_00004.jpg",
    "test/102/image_00005.jpg", "test/1/image_00006.jpg",
}


def jpeg_bytes(image_id: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (image_id * 40 % 256, 0, 0)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_metadata(directory, labels=LABELS, setid=SETID):
    directory.mkdir(parents=True, exist_ok=True)
    # 1 x N row vectors of doubles, the shape the real files have.
    savemat(directory / "imagelabels.mat", {"labels": np.array([labels], dtype=float)})
    savemat(directory / "setid.mat", {k: np.array([v], dtype=float) for k, v in setid.items()})


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_source(directory, labels=LABELS, setid=SETID, extra_members=()):
    """The three files as Oxford publishes them, with len(labels) images in the archive."""
    write_metadata(directory, labels, setid)
    with tarfile.open(directory / "102flowers.tgz", "w:gz") as tar:
        for name, data in extra_members:
            add_member(tar, name, data)
        for image_id in range(1, len(labels) + 1):
            add_member(tar, f"jpg/image_{image_id:05d}.jpg", jpeg_bytes(image_id))
    return directory


def layout(out):
    """Every file under OUT except the state file, as 'split/category/name'."""
    return {p.relative_to(out).as_posix() for p in out.rglob("*")
            if p.is_file() and p.name != oxford102.STATE_FILE}


def test_builds_layout_from_archive(tmp_path):
    source = make_source(tmp_path / "src")
    out = tmp_path / "flowers"
    counts = prepare_oxford102(out, source_dir=source, progress=False)
    assert counts == {"train": 2, "valid": 2, "test": 2}
    assert layout(out) == EXPECTED
    assert (out / "test/102/image_00005.jpg").read_bytes() == jpeg_bytes(5)
    assert json.loads((out / oxford102.STATE_FILE).read_text())["complete"] is True


def test_rerun_over_complete_layout_does_nothing(tmp_path, capsys):
    source = make_source(tmp_path / "src")
    out = tmp_path / "flowers"
    prepare_oxford102(out, source_dir=source, progress=False)
    for f in source.iterdir():
        f.unlink()  # the rerun must not need the source any more
    assert prepare_oxford102(out, source_dir=source) == {"train": 2, "valid": 2, "test": 2}
    assert "already holds the complete" in capsys.readouterr().err


def test_interrupted_run_can_be_rerun(tmp_path, monkeypatch):
    source = make_source(tmp_path / "src")
    out = tmp_path / "flowers"
    real_copy, calls = oxford102.shutil.copyfileobj, []

    def copy_then_die(src, dst, *args):
        calls.append(1)
        if len(calls) == 4:
            dst.write(b"half an image")
            raise KeyboardInterrupt
        real_copy(src, dst, *args)

    monkeypatch.setattr(oxford102.shutil, "copyfileobj", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_oxford102(out, source_dir=source, progress=False)
    assert len(layout(out) & EXPECTED) == 3
    monkeypatch.undo()

    assert prepare_oxford102(out, source_dir=source, progress=False) == {"train": 2, "valid": 2, "test": 2}
    assert layout(out) == EXPECTED  # no leftover temporary files either
    assert all((out / f).read_bytes() == jpeg_bytes(int(f[-9:-4])) for f in EXPECTED)


def test_malicious_members_are_not_written(tmp_path):
    evil = [("../evil.jpg", b"x"), ("jpg/../../evil2.jpg", b"x"), ("/tmp/evil3.jpg", b"x"),
            ("jpg/image_00001.jpg/../../evil4.jpg", b"x")]
    source = make_source(tmp_path / "src", extra_members=evil)
    out = tmp_path / "a" / "flowers"
    prepare_oxford102(out, source_dir=source, progress=False)
    assert layout(out) == EXPECTED
    assert not [p for p in tmp_path.rglob("evil*")]
    assert not os.path.exists("/tmp/evil3.jpg")


def test_link_member_in_archive_is_not_followed(tmp_path):
    source = tmp_path / "src"
    write_metadata(source)
    with tarfile.open(source / "102flowers.tgz", "w:gz") as tar:
        link = tarfile.TarInfo("jpg/image_00001.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        for image_id in range(2, 7):
            add_member(tar, f"jpg/image_{image_id:05d}.jpg", jpeg_bytes(image_id))
    with pytest.raises(UserError, match="lacks 1 of the 6 images.*image_00001.jpg"):
        prepare_oxford102(tmp_path / "flowers", source_dir=source, progress=False)
    assert not (tmp_path / "flowers/train/1/image_00001.jpg").exists()


def test_torchvision_root_with_unpacked_images(tmp_path):
    base = tmp_path / "tv" / "flowers-102"  # what torchvision.datasets.Flowers102(tmp_path / "tv") leaves
    write_metadata(base)
    (base / "jpg").mkdir()
    for image_id in range(1, 7):
        (base / "jpg" / f"image_{image_id:05d}.jpg").write_bytes(jpeg_bytes(image_id))
    out = tmp_path / "flowers"
    assert prepare_oxford102(out, source_dir=tmp_path / "tv", link=True, progress=False) == \
        {"train": 2, "valid": 2, "test": 2}
    assert layout(out) == EXPECTED
    assert os.path.samefile(out / "valid/2/image_00004.jpg", base / "jpg/image_00004.jpg")


def test_classic_split_is_stratified_and_repeatable(tmp_path):
    labels = [7] * 20 + [9] * 10
    source = make_source(tmp_path / "src", labels=labels, setid={"trnid": [1], "valid": [2], "tstid": [3]})
    first = prepare_oxford102(tmp_path / "a", source_dir=source, split="classic", progress=False)
    second = prepare_oxford102(tmp_path / "b", source_dir=source, split="classic", progress=False)
    assert first == second == {"train": 24, "valid": 3, "test": 3}
    assert layout(tmp_path / "a") == layout(tmp_path / "b")
    assert len(list((tmp_path / "a/valid/7").iterdir())) == 2
    assert len(list((tmp_path / "a/test/9").iterdir())) == 1


def test_refuses_other_data_and_other_split(tmp_path):
    source = make_source(tmp_path / "src")
    foreign = tmp_path / "foreign"
    (foreign / "train" / "roses").mkdir(parents=True)
    (foreign / "train" / "roses" / "a.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="did not make"):
        prepare_oxford102(foreign, source_dir=source, progress=False)

    out = tmp_path / "flowers"
    prepare_oxford102(out, source_dir=source, progress=False)
    with pytest.raises(UserError, match="--split original"):
        prepare_oxford102(out, source_dir=source, split="classic", progress=False)
    with pytest.raises(UserError, match="unknown --split"):
        prepare_oxford102(out, source_dir=source, split="udacity", progress=False)


def test_no_download_without_source_names_the_three_urls(tmp_path, capsys):
    with pytest.raises(UserError) as caught:
        prepare_oxford102(tmp_path / "flowers", download=False, progress=False)
    message = str(caught.value)
    for name in ("102flowers.tgz", "imagelabels.mat", "setid.mat"):
        assert oxford102.BASE_URL + name in message
    assert "--no_download" in message and "--source DIR" in message and "\n" not in message
    # The same through the command line: one line, exit 2.
    from flower_classifier.cli import main
    assert main(["download", str(tmp_path / "flowers"), "--no_download", "--quiet"]) == 2
    assert oxford102.BASE_URL + "setid.mat" in capsys.readouterr().err


@pytest.mark.parametrize("download", [True, False])
def test_mistyped_source_says_the_folder_does_not_exist(tmp_path, monkeypatch, download):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download for a mistyped --source"))
    with pytest.raises(UserError, match="--source .*nothing: no such folder") as caught:
        prepare_oxford102(tmp_path / "flowers", source_dir=tmp_path / "nothing", download=download, progress=False)
    assert "offline" not in str(caught.value)
    assert not (tmp_path / "nothing").exists()  # not created either
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="--source .*a_file: is a file"):
        prepare_oxford102(tmp_path / "flowers", source_dir=tmp_path / "a_file", download=download, progress=False)


@pytest.mark.parametrize("missing", ["102flowers.tgz", "imagelabels.mat", "setid.mat"])
@pytest.mark.parametrize("torchvision_root", [False, True])
def test_source_missing_one_file_names_that_file(tmp_path, missing, torchvision_root):
    root = tmp_path / "src"
    files = make_source(root / "flowers-102" if torchvision_root else root)
    (files / missing).unlink()
    with pytest.raises(UserError) as caught:
        prepare_oxford102(tmp_path / "flowers", source_dir=root, download=False, progress=False)
    message = str(caught.value)
    assert f"{files}: lacks {missing};" in message
    assert not any(other in message.split("lacks", 1)[1].split(";")[0] for other in
                   {"102flowers.tgz", "imagelabels.mat", "setid.mat"} - {missing})


def test_empty_source_says_what_it_needs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: holds none of 102flowers.tgz, imagelabels.mat and setid.mat"):
        prepare_oxford102(tmp_path / "flowers", source_dir=tmp_path / "empty", download=False, progress=False)


@pytest.mark.parametrize("labels, found", [
    ([1, 2, 1, 2, 103, 1], "1..103"),  # above 102
    ([1, 2, 1, 2, 250, 1], "1..250"),
    ([0, 2, 1, 2, 102, 1], "0..102"),  # below 1, as before
    ([1, 2.5, 1, 2, 102, 1], None),  # not whole numbers
    ([1, 2, 1, 2, float("nan"), 1], None),
    ([1, 2, 1, 2, float("inf"), 1], None),
])
def test_labels_outside_1_to_102_or_not_whole_are_refused_in_one_line(tmp_path, labels, found):
    source = make_source(tmp_path / "src", labels=labels)
    with pytest.raises(UserError) as caught:
        prepare_oxford102(tmp_path / "flowers", source_dir=source, progress=False)
    message = str(caught.value)
    assert message.startswith(f"{source / 'imagelabels.mat'}: categories must be whole numbers from 1 to 102")
    assert "\n" not in message and (found is None or f"(found {found})" in message)
    assert not (tmp_path / "flowers" / "train").exists()


def test_image_ids_that_are_not_whole_numbers_are_refused(tmp_path):
    source = make_source(tmp_path / "src", setid={"trnid": [1, 2.5], "valid": [3, 4], "tstid": [5, 6]})
    with pytest.raises(UserError, match="setid.mat: image ids must be whole numbers"):
        prepare_oxford102(tmp_path / "flowers", source_dir=source, progress=False)


def test_classic_split_warns_about_categories_too_small_for_valid_and_test(tmp_path, capsys):
    labels = [7] * 20 + [8] * 4 + [9] * 2 + [10] * 5  # 8 and 9: fewer than 5 images; 10: exactly enough
    source = make_source(tmp_path / "src", labels=labels, setid={"trnid": [1], "valid": [2], "tstid": [3]})
    counts = prepare_oxford102(tmp_path / "flowers", source_dir=source, split="classic", progress=False)
    err = capsys.readouterr().err
    (line,) = [l for l in err.splitlines() if l.startswith("warning:")]
    assert "--split classic: 2 categories have fewer than 5 images" in line and "8 (4), 9 (2)" in line
    assert "10 (" not in line
    assert not (tmp_path / "flowers/valid/8").exists() and not (tmp_path / "flowers/test/9").exists()
    assert counts == {"train": 16 + 4 + 2 + 3, "valid": 2 + 1, "test": 2 + 1}
    # Nothing to say when every category is big enough, nor for the original split.
    prepare_oxford102(tmp_path / "big", source_dir=make_source(tmp_path / "src2", labels=[7] * 5 + [9] * 10),
                      split="classic", progress=False)
    prepare_oxford102(tmp_path / "orig", source_dir=source, progress=False)
    assert "warning" not in capsys.readouterr().err


def unpacked_source(base):
    write_metadata(base)
    (base / "jpg").mkdir()
    for image_id in range(1, 7):
        (base / "jpg" / f"image_{image_id:05d}.jpg").write_bytes(jpeg_bytes(image_id))
    return base


def test_link_says_when_it_had_to_copy(tmp_path, monkeypatch, capsys):
    import errno

    base = unpacked_source(tmp_path / "src")
    calls = []

    def other_filesystem(src, dst, *args, **kwargs):
        calls.append(src)
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))

    monkeypatch.setattr(oxford102.os, "link", other_filesystem)
    out = tmp_path / "flowers"
    assert prepare_oxford102(out, source_dir=base, link=True, progress=False) == {"train": 2, "valid": 2, "test": 2}
    assert layout(out) == EXPECTED and len(calls) == 1  # tried once, then copied
    assert not os.path.samefile(out / "valid/2/image_00004.jpg", base / "jpg/image_00004.jpg")
    (line,) = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert "--link: cannot hard-link" in line and "Invalid cross-device link" in line and "copied instead" in line


def test_link_that_works_says_nothing(tmp_path, capsys):
    base = unpacked_source(tmp_path / "src")
    prepare_oxford102(tmp_path / "flowers", source_dir=base, link=True, progress=False)
    assert "warning" not in capsys.readouterr().err


def test_check_data_reports_an_unfinished_download(tmp_path, monkeypatch):
    from flower_classifier.datacheck import check_data

    source = make_source(tmp_path / "src")
    out = tmp_path / "flowers"
    real_copy, calls = oxford102.shutil.copyfileobj, []

    def copy_then_die(src, dst, *args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real_copy(src, dst, *args)

    monkeypatch.setattr(oxford102.shutil, "copyfileobj", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_oxford102(out, source_dir=source, progress=False)
    monkeypatch.undo()
    report = check_data(out)
    (problem,) = [p for p in report.problems if oxford102.STATE_FILE in p]
    assert "did not finish" in problem and f"download {out} --split original" in problem
    prepare_oxford102(out, source_dir=source, progress=False)  # the rerun the message asks for
    assert not [p for p in check_data(out).problems if oxford102.STATE_FILE in p]
    (out / oxford102.STATE_FILE).write_text("{not json")
    (problem,) = [p for p in check_data(out).problems if oxford102.STATE_FILE in p]
    assert "unreadable" in problem


def test_offline_download_names_the_url_and_the_source_option(tmp_path, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as caught:
        prepare_oxford102(tmp_path / "flowers", progress=False)
    message = str(caught.value)
    assert "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat" in message
    assert "offline" in message and "--source DIR" in message and "\n" not in message
    assert not (tmp_path / "flowers" / "train").exists()


class FakeResponse(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_download_then_build(tmp_path, monkeypatch):
    served = make_source(tmp_path / "server")
    files = {p.name: p.read_bytes() for p in served.iterdir()}
    monkeypatch.setattr(oxford102, "MD5", {n: hashlib.md5(d).hexdigest() for n, d in files.items()})
    requested = []

    def fake_urlopen(url, *args, **kwargs):
        requested.append(url)
        return FakeResponse(files[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    out = tmp_path / "flowers"
    assert prepare_oxford102(out, progress=False) == {"train": 2, "valid": 2, "test": 2}
    assert layout(out) - {f"{oxford102.DEFAULT_SOURCE}/{n}" for n in files} == EXPECTED
    assert sorted(requested) == sorted(oxford102.BASE_URL + n for n in files)


def test_damaged_download_is_discarded(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, *a, **k: FakeResponse(b"not a mat file"))
    with pytest.raises(UserError, match="damaged"):
        prepare_oxford102(tmp_path / "flowers", progress=False)
    assert not list((tmp_path / "flowers" / oxford102.DEFAULT_SOURCE).iterdir())
