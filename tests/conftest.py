"""Shared test setup: where the full data sets are (if anywhere), fixtures, CPU threads, seeds.

Unit tests read the small fixtures in tests/fixtures/. Tests that need a full data set take the
`data_root` fixture (or the `needs_data` mark) and are skipped with one line when none is found:
$SENTEMB_DATA (.ci/run points it at ../shared/data), else data/ filled by data/download.py."""
import os
import pathlib
import signal
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")   # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _find_data():
    for d in (os.environ.get("SENTEMB_DATA"), ROOT / "data"):
        if d and (pathlib.Path(d) / "sts").is_dir():
            return pathlib.Path(d)
    return None


DATA = _find_data()
if DATA is not None:
    os.environ["SENTEMB_DATA"] = str(DATA)
else:
    os.environ.pop("SENTEMB_DATA", None)
NO_DATA = "no full data set: set SENTEMB_DATA or run `python data/download.py`"
needs_data = pytest.mark.skipif(DATA is None, reason=NO_DATA)


@pytest.fixture
def data_root():
    if DATA is None:
        pytest.skip(NO_DATA)
    return DATA


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: with other jobs on the CPU, a second OpenMP thread makes them ~50x slower."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _sigint():
    """A test that leaves Ctrl-C ignored would pass that on to every subprocess after it."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)
