"""bench/: st_baseline.py scores a sentence-transformers baseline with evaluate.py's scorers and
writes its record layout, with one-line user errors; mteb_stsb.py puts mteb's STS-B score beside
evaluate.py's. Each bench script is loaded from its file: nothing outside docs/ and bench/ imports
from them."""
import importlib.util
import json

import numpy as np
import pytest
from conftest import FIXTURES, ROOT
from helpers import LLAMA_GQA, hf_model, save

import evaluate as ev
from support.cache import CachedEncoder
from support.cli import cli

FIX = FIXTURES / "data"  # a few pairs of every STS file, in the real layout


class PlainEncoder:
    """Deterministic pseudo-random vectors per sentence; no fingerprint, as a peer baseline."""

    fingerprint = None

    def encode(self, sentences):
        vectors = []
        for s in sentences:
            seed = int.from_bytes(s.encode()[:8].ljust(8, b"\0"), "little") + len(s)
            vectors.append(np.random.default_rng(seed).normal(size=8))
        return np.array(vectors, np.float32)


def load(name):
    """bench/<name>.py as a module, from its file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def st_baseline():
    return load("st_baseline")


def test_st_baseline_writes_evaluates_record_layout_without_a_disk_cache(st_baseline, tmp_path,
                                                                         capsys, monkeypatch):
    monkeypatch.setenv("SENTEMB_CACHE", str(tmp_path / "cache"))
    loaded = {n: ev.load_task(n, FIX) for n in ev.parse_tasks("sts,stsb-dev")}
    out = tmp_path / "r.json"
    rec = st_baseline.baseline(PlainEncoder(), "st-dir", 22, loaded, FIX, out, argv=["st-dir"])
    assert json.loads(out.read_text()).keys() == rec.keys()
    assert rec["command"] == ["bench/st_baseline.py", "st-dir"]
    assert rec["encoder"] == {"sentence_transformers": "st-dir"}
    assert rec["params"] == 22 and rec["cache"] is None
    tasks = ["STS12", "STS13", "STS14", "STS15", "STS16", "STS-B", "SICK-R", "STS-B dev"]
    assert list(rec["summary_x100"]) == tasks
    assert "st-dir" in capsys.readouterr().out and not (tmp_path / "cache").exists()
    row = ev.evaluate("st-dir", 22, CachedEncoder(PlainEncoder(), disk=False), loaded)
    assert rec["summary_x100"] == row["summary_x100"]  # the same scorers as evaluate.py


def test_st_baseline_user_errors_are_one_line(st_baseline, tmp_path, capsys):
    assert cli(st_baseline.main, [str(tmp_path), "--output", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err
    assert err == (f"sentemb: error: {tmp_path} is not a sentence-transformers model directory "
                   f"(no modules.json)\n")
    assert cli(st_baseline.main, [str(tmp_path), "--tasks", "nope", "--output", "r.json"]) == 1
    assert capsys.readouterr().err.startswith("sentemb: error: unknown task 'nope'")


def test_mteb_stsb_scores_the_fixture_as_evaluate_py(tmp_path, capsys):
    pytest.importorskip("mteb")
    model = tmp_path / "tiny"
    save(hf_model(LLAMA_GQA), model)
    out = tmp_path / "b.json"
    load("mteb_stsb").main(["--model", str(model), "--dtype", "float32", "--demonstration", "none",
                            "--no-cache", "--data-dir", str(FIX), "--output", str(out)])
    assert "mteb STSBenchmark" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["pairs"] == 8 and abs(record["mteb"] - record["evaluate.py"]) <= 0.01
