"""Shared test plumbing: seeds, the cache of reference checkpoints built by transformers, the hub/cuda gates.

Reference checkpoints are transformers models of the real configs with seeded random weights, written with
save_pretrained. Building one takes seconds to a minute, so each is cached under tests/.cache/ (git-ignored) in a
folder keyed by a hash of everything that shapes it: the config, the builder's version tag, the transformers and
torch versions. Delete the folder to rebuild.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

TESTS = Path(__file__).parent
DATA = TESTS / "data"
CACHE = Path(os.environ.get("DETR_TEST_CACHE", TESTS / ".cache"))
PHOTOS = ["coco_000000039769.png", "skimage_chelsea.png", "skimage_coffee.png"]

torch.backends.cuda.matmul.allow_tf32 = False  # reference numbers are plain fp32
torch.backends.cudnn.allow_tf32 = False


def pytest_addoption(parser):
    parser.addoption("--hub", action="store_true", help="run tests that download the real Hub checkpoints")


def pytest_collection_modifyitems(config, items):
    skip_hub = pytest.mark.skip(reason="needs the Hugging Face Hub: run with --hub on a connected machine")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "hub" in item.keywords and not config.getoption("--hub"):
            item.add_marker(skip_hub)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def hub():
    """For tests marked `hub`: skip, rather than fail, where --hub was given but the Hub cannot be reached."""
    import huggingface_hub

    try:
        huggingface_hub.model_info("ustc-community/dfine-small-coco", timeout=10)
    except Exception as e:  # offline, DNS, proxy: all mean the same here
        pytest.skip(f"the Hugging Face Hub is not reachable ({type(e).__name__})")


@pytest.fixture(autouse=True)
def seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def cached_checkpoint(tag: str, key: dict, build: Callable[[Path], None]) -> Path:
    """Return a folder built once by build(folder) and reused while `key` (anything JSON) stays the same."""
    import transformers

    blob = json.dumps({"key": key, "transformers": transformers.__version__, "torch": torch.__version__},
                      sort_keys=True, default=str)
    folder = CACHE / f"{tag}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    if (folder / ".done").is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")  # processes building the same folder (test_dispatch's
    shutil.rmtree(tmp, ignore_errors=True)  # runs side by side) each build their own, and the first one done wins
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".done").write_text(blob)
    if not (folder / ".done").is_file():
        shutil.rmtree(folder, ignore_errors=True)  # a build cut short
    try:
        tmp.rename(folder)
    except OSError:  # another process was done first
        shutil.rmtree(tmp)
    return folder


def hub_config(name: str) -> dict:
    """A real checkpoint's config.json, shipped in tests/data/configs/ (name without .json, e.g. dfine_l_coco)."""
    return json.loads((DATA / "configs" / f"{name}.json").read_text())
