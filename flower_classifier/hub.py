"""Whether a torchvision backbone's pretrained weights are here or can be downloaded, asked without
importing torch: `train.py DATA` with the vgg16 default on a machine without internet is refused in
about a second, naming the backbone that works offline, instead of after torch, the data scan and the
model build (half a minute on a busy machine)."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

OFFLINE_CHOICE = "efficientnet_lite0"  # its weights come with pip: it works without internet

# The weights each torchvision backbone loads, named once: they also decide its preprocessing.
# SWAG linear: the SWAG trunk (weakly supervised on Instagram hashtags, arXiv 2201.08371) kept frozen
# under a linear ImageNet classifier at 224 px: features meant to be used as they are, like ours.
TORCHVISION_WEIGHTS = {"vgg16": "IMAGENET1K_V1", "vgg13": "IMAGENET1K_V1", "resnet50": "IMAGENET1K_V2",
                       "densenet121": "IMAGENET1K_V1", "efficientnet_b0": "IMAGENET1K_V1",
                       "vit_b_16": "IMAGENET1K_SWAG_LINEAR_V1", "regnet_y_16gf": "IMAGENET1K_SWAG_LINEAR_V1",
                       "convnext_tiny": "IMAGENET1K_V1", "efficientnet_v2_s": "IMAGENET1K_V1"}
WEIGHTS_HOST = ("download.pytorch.org", 443)
PROBE_S = 3.0  # a probe that has no answer by then decides nothing: the download itself will tell


def hub_dir() -> Path:
    """torch.hub.get_dir(), by torch's own rule, without importing torch when it is not loaded yet."""
    import sys

    if "torch" in sys.modules:  # set_dir may have moved it
        return Path(sys.modules["torch"].hub.get_dir())
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


def weights_cached(arch: str) -> bool:
    """Whether torchvision has already downloaded `arch`'s weights (its files are named
    `<arch>-<hash>.pth` or `<arch>_<variant>-<hash>.pth`)."""
    folder = hub_dir() / "checkpoints"
    return folder.is_dir() and any(f.name.startswith((f"{arch}-", f"{arch}_")) for f in folder.iterdir())


def reachable(host: tuple[str, int] = WEIGHTS_HOST, timeout: float = PROBE_S) -> str | None:
    """None if a connection to `host` opens (or no answer came in `timeout`: undecided), else why not.
    A proxy set in the environment is trusted: the download goes through it."""
    import socket
    import threading

    if any(os.getenv(v) for v in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")):
        return None
    outcome: list[str | None] = []

    def probe():
        try:
            socket.create_connection(host, timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(str(e.strerror or e))

    thread = threading.Thread(target=probe, daemon=True)  # name resolution has no timeout of its own
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else None


def check_weights_reachable(arch: str) -> None:
    """Refuse, in one line, a torchvision backbone whose weights are neither cached nor downloadable."""
    if arch not in TORCHVISION_WEIGHTS or weights_cached(arch):
        return
    why = reachable()
    if why is not None:
        raise UserError(f"--arch {arch} needs its pretrained weights from {WEIGHTS_HOST[0]}, which cannot be "
                        f"reached ({why}): use --arch {OFFLINE_CHOICE}, whose weights come with pip and work "
                        f"offline, or connect once (torchvision keeps them in {hub_dir() / 'checkpoints'})")
