"""support/mteb.py: an Embedder as mteb's encoder scores an STS task built from a local fixture as
evaluate.py scores the same pairs; per-task demonstrations, the embedding cache, model metadata;
one-line errors (mteb missing, a task mteb doesn't know, its data offline)."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import embed as E
import evaluate as EV
from conftest import FIXTURES, ROOT
from support import mteb as SM
from support.cli import UserError, cli
from helpers import LLAMA_GQA, hf_model, save

mteb = pytest.importorskip("mteb")
DEMO = [("A jockey riding a horse.", "Equestrian")]
OTHER = [("A cat sleeps.", "Rest")]
SENTS = ["A man plays a guitar.", "Someone is playing music", 'He said "hi"?', "x"]
# (mteb task, loader, fixture root, split, the Embedder's demonstrations)
CASES = {"STSBenchmark": (EV.load_stsb, FIXTURES / "icl", "dev", []),   # 24 pairs
         "SICK-R": (EV.load_sick, FIXTURES / "data", "test", DEMO)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    save(hf_model(LLAMA_GQA), d)
    return str(d)


@pytest.fixture(scope="module")
def emb(tiny):
    return E.Embedder(tiny, dtype="float32", demonstrations=[])   # parity in float32, on any CPU


def quiet(embedder, **kw):
    return SM.MtebEncoder(embedder, **{"cache": False, "progress": False, **kw})


@pytest.mark.parametrize("name", CASES)
def test_mteb_spearman_equals_evaluate_py_on_a_local_fixture(emb, name):
    load, root, split, demos = CASES[name]
    pairs = load(root, split)
    e = emb.with_demonstrations(demos)
    enc = e.as_mteb(cache=False, progress=False)
    assert isinstance(enc, mteb.EncoderProtocol)
    task = SM.local_sts_task(name, pairs.a, pairs.b, pairs.gold)
    assert task.metadata.name == name and task.metadata.main_score == "cosine_spearman"
    got = SM.run(enc, [task])[name]["score"]
    want = EV.score_sts({split: pairs}, EV.embed_all(e, pairs.a + pairs.b, progress=False))
    assert np.isfinite(got) and abs(got - want["score"]) <= 0.01


def test_demonstrations_per_task_name_then_type_else_the_embedders(emb):
    stsb, sick = SM.get_task("STSBenchmark"), SM.get_task("SICK-R")
    retrieval = SM.get_task("SciFact")
    enc = quiet(emb, demonstrations={"STS": DEMO, "SICK-R": OTHER})
    assert enc.demonstrations_for(stsb.metadata) == DEMO            # its type's
    assert enc.demonstrations_for(sick.metadata) == OTHER           # its name wins over its type
    assert enc.demonstrations_for(retrieval.metadata) == []         # the Embedder's own
    batches = [{"text": SENTS[:3]}, {"text": SENTS[3:]}]           # what mteb's DataLoader yields
    got = enc.encode(batches, task_metadata=sick.metadata, hf_split="test", hf_subset="default")
    np.testing.assert_allclose(got, emb.with_demonstrations(OTHER).encode(SENTS), atol=1e-5)
    every = quiet(emb, demonstrations=DEMO)                         # a list: every task
    assert every.demonstrations_for(retrieval.metadata) == DEMO


@pytest.mark.parametrize("demos,message", [({"NoSuchTask": DEMO}, "does not know the task"),
                                           ({"STS": 5}, "demonstrations must be"),
                                           ({"STS": [("one",)]}, "demonstrations must be"),
                                           ([("a", "b", "c")], "demonstrations must be")])
def test_bad_demonstrations_fail_at_once(emb, demos, message):
    with pytest.raises(UserError, match=message):
        quiet(emb, demonstrations=demos)


def test_the_embedding_cache_serves_a_second_run(emb, tmp_path, capsys):
    pairs = EV.load_sick(FIXTURES / "data", "test")
    task = SM.local_sts_task("SICK-R", pairs.a, pairs.b, pairs.gold)
    first = SM.MtebEncoder(emb, cache_dir=tmp_path)
    score = SM.run(first, [task])["SICK-R"]["score"]
    assert first.n_encoded == len(set(pairs.a + pairs.b))
    assert "encoding" in capsys.readouterr().err                   # progress shows
    again = SM.MtebEncoder(emb, cache_dir=tmp_path)
    assert SM.run(again, [task])["SICK-R"]["score"] == score and again.n_encoded == 0


def test_model_metadata(emb, tiny):
    meta = quiet(emb).mteb_model_meta
    assert meta.name == "sentemb/" + Path(tiny).name and meta.revision.startswith("sentemb-")
    assert meta.n_parameters == sum(p.numel() for p in emb.model.parameters())
    assert meta.embed_dim == 64 and meta.max_tokens == LLAMA_GQA["max_position_embeddings"]
    assert meta.similarity_fn_name.value == "cosine" and meta.framework == ["PyTorch"]
    assert meta.experiment_kwargs["pooling"] == "last"
    assert meta.experiment_kwargs["template"] == E.TEMPLATES["eol"]
    other = quiet(emb, demonstrations={"STS": DEMO}).mteb_model_meta   # results stay apart
    assert other.experiment_kwargs != meta.experiment_kwargs


@pytest.mark.parametrize("model,adapter,name,base", [
    ("opt-125m", None, "facebook/opt-125m", None),
    ("smollm2-135m", None, "sentemb/smollm2-135m", None),
    ("Qwen/Qwen2-0.5B", "someone/qwen-cse", "someone/qwen-cse", "Qwen/Qwen2-0.5B"),
    ("opt-1.3b", "runs/cse/best", "sentemb/cse-best", "facebook/opt-1.3b")])
def test_names_as_mteb_spells_them(model, adapter, name, base):
    fake = SimpleNamespace(fingerprint={"model": model, "adapter": adapter},
                           model=SimpleNamespace(source="/nowhere"))
    assert SM._names(fake) == (name, base)


def test_task_names_and_unknown_tasks():
    assert SM.task_names("mteb:STSBenchmark, SICK-R,STSBenchmark") == ["STSBenchmark", "SICK-R"]
    for spec in ("mteb:", "mteb: ,", "STSBenchmark"):
        with pytest.raises(UserError, match="expected mteb:NAME"):
            SM.task_names(spec)
    with pytest.raises(UserError, match="mteb does not know the task 'STSbenchmrk'"):
        SM.get_task("STSbenchmrk")
    with pytest.raises(UserError, match="is a Retrieval task, not STS"):
        SM.local_sts_task("SciFact", ["a"], ["b"], [1.0])


def test_missing_mteb_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mteb", None)   # import mteb now raises ImportError
    assert cli(EV.main, ["--tasks", "mteb:STSBenchmark"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith(SM.INSTALL)


def test_evaluate_py_mteb_tasks_record_and_table(tiny, tmp_path, monkeypatch, capsys):
    """evaluate.py --tasks mteb:SICK-R with mteb's task served from the fixture (no hub): the
    same number as evaluate.py's own sickr on the same pairs, a table and a JSON record."""
    pairs = EV.load_sick(FIXTURES / "data", "test")
    task = SM.local_sts_task("SICK-R", pairs.a, pairs.b, pairs.gold)
    monkeypatch.setattr(SM, "get_task", lambda name: task)
    flags = ["--model", tiny, "--dtype", "float32", "--demonstration", "none", "--no-cache"]
    EV.main(["--tasks", "mteb:SICK-R", "--output", str(tmp_path / "m.json"), *flags])
    assert "mteb, main score x100" in capsys.readouterr().out
    ours = ["--tasks", "sickr", "--data-dir", str(FIXTURES / "data"), *flags]
    EV.main([*ours, "--output", str(tmp_path / "e.json")])
    got = json.loads((tmp_path / "m.json").read_text())
    want = json.loads((tmp_path / "e.json").read_text())
    assert got["mteb_model_meta"]["embed_dim"] == 64 and got["command"][0] == "evaluate.py"
    assert abs(got["summary_x100"]["SICK-R"] - want["summary_x100"]["SICK-R"]) <= 1.0


@pytest.mark.parametrize("tasks,message", [("mteb:SICK-R", "mteb task SICK-R: its data"),
                                           ("mteb:NoSuchTask", "does not know the task")])
def test_evaluate_py_offline_says_what_is_missing_in_one_line(tmp_path, tasks, message):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))   # an empty cache: nothing to find
    args = [sys.executable, "evaluate.py", "--tasks", tasks, "--output", str(tmp_path / "r.json")]
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stderr.splitlines() if "error:" in line]
    assert run.returncode == 1 and len(lines) == 1 and message in lines[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr and not (tmp_path / "r.json").exists()
