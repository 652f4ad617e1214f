"""Shared test setup: data directory, CPU threads, deterministic seeds."""
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The shared data sets live beside the checkout; the code finds them through this variable.
os.environ.setdefault("SENTEMB_DATA", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")   # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)
