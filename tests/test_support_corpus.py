"""support/corpus.py: a streamed file equals Embedder.encode; resume after an interruption; 2 gloo processes (spawned, and
under torchrun) equal one; the GPU placement plan; a placed model equals the unplaced one."""
import gzip
import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from support import corpus as C
import embed as E
from support.cli import UserError

LINES = [f"Sentence number {i} is {'long ' * (i % 7)}here." for i in range(37)] + ["", "  ", "Ça va? «oui»"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny matrices run best on one thread


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_model import LLAMA_GQA, hf_model, save   # imports transformers: only here, not in spawned workers
    d = tmp_path_factory.mktemp("tiny")
    save(hf_model(LLAMA_GQA), d)
    return str(d)


@pytest.fixture(scope="module")
def emb(tiny):
    return E.Embedder(tiny, demonstrations=[("A jockey riding a horse.", "Equestrian")], batch_size=4)


@pytest.fixture
def corpus_gz(tmp_path):
    p = tmp_path / "corpus.txt.gz"
    p.write_bytes(gzip.compress(("\ufeff" + "\r\n".join(LINES)).encode()))   # a BOM, CRLF, no final newline
    return p


def test_npy_equals_encode_and_leaves_nothing_else(emb, corpus_gz, tmp_path):
    out = tmp_path / "emb.npy"
    st = C.embed_file(emb, corpus_gz, out, chunk=8)
    assert st["rows"] == st["embedded"] == len(LINES)
    np.testing.assert_allclose(np.load(out), emb.encode(LINES), atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt.gz", "emb.npy"]


def test_jsonl_and_safetensors(emb, corpus_gz, tmp_path):
    from safetensors.numpy import load_file
    want = emb.encode(LINES, normalize=True)
    C.embed_file(emb, corpus_gz, tmp_path / "e.jsonl", normalize=True, chunk=8)
    rows = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["sentence"] for r in rows] == LINES
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), want, atol=1e-6, rtol=0)
    C.embed_file(emb, corpus_gz, tmp_path / "e.safetensors", normalize=True, chunk=8)
    np.testing.assert_allclose(load_file(str(tmp_path / "e.safetensors"))["embeddings"], want, atol=1e-6, rtol=0)


def interrupt_after(emb, monkeypatch, n):
    calls = []

    def encode(sentences, **kw):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(len(sentences))
        return E.Embedder.encode(emb, sentences, **kw)
    monkeypatch.setattr(emb, "encode", encode)
    return calls


def test_an_interrupted_run_resumes_where_it_stopped(emb, corpus_gz, tmp_path, monkeypatch, capsys):
    out = tmp_path / "emb.npy"
    interrupt_after(emb, monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        C.embed_file(emb, corpus_gz, out, chunk=8)
    assert C.kept == f"16 of {len(LINES)} rows done; re-run the command to resume"
    record, = tmp_path.glob("emb.npy.*.progress.0.json")
    assert not out.exists() and json.loads(record.read_text())["done"] == 2
    calls = interrupt_after(emb, monkeypatch, 99)
    assert C.embed_file(emb, corpus_gz, out, chunk=8)["embedded"] == len(LINES) - 16
    assert calls == [8, 8, 8]                                 # chunks 2, 3 and 4 only
    np.testing.assert_allclose(np.load(out), emb.encode(LINES), atol=1e-5, rtol=0)
    assert "afresh" not in capsys.readouterr().err


def test_another_command_starts_afresh(emb, corpus_gz, tmp_path, monkeypatch, capsys):
    out = tmp_path / "emb.npy"
    interrupt_after(emb, monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        C.embed_file(emb, corpus_gz, out, chunk=8)
    calls = interrupt_after(emb, monkeypatch, 99)
    C.embed_file(emb, corpus_gz, out, normalize=True, chunk=8)
    assert "emb.npy: the partial run there is another command's" in capsys.readouterr().err and len(calls) == 5
    np.testing.assert_allclose(np.load(out), emb.encode(LINES, normalize=True), atol=1e-5, rtol=0)


def test_user_errors(emb, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"ok\nok\ncaf\xe9\n")
    (tmp_path / "empty.txt").write_text("")
    for args, message in [((tmp_path / "none.txt", tmp_path / "e.npy"), "cannot read"),
                          ((bad, tmp_path / "e.npy"), "latin1.txt line 3 is not UTF-8: convert it"),
                          ((bad, tmp_path / "no" / "e.npy"), "in an existing folder"),
                          ((bad, tmp_path / "e.csv"), "name a .npy, .jsonl or .safetensors file")]:
        with pytest.raises(UserError, match=message):
            C.embed_file(emb, *args, chunk=2)
    with pytest.raises(UserError, match=f"^{tmp_path}/empty.txt is empty: nothing to embed$"):
        C.embed_file(emb, tmp_path / "empty.txt", tmp_path / "e.npy")
    assert not (tmp_path / "e.npy").exists()


def test_cli(tiny, corpus_gz, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    assert E.main(["--model", tiny, "--demonstration", "none", "--input", str(corpus_gz), "--output", str(out)]) is None
    err = capsys.readouterr().err
    assert f"{len(LINES)} sentences, {len(LINES)} embedded by this run in" in err and "sentences/s in " in err and f" -> {out}" in err
    assert np.load(out).shape == (len(LINES), 64)


def test_torchrun_cli_equals_one_process(tiny, corpus_gz, tmp_path):
    """Under torchrun (gloo, CPU) with one chunk for two ranks: rank 1 has nothing to do and waits for rank 0."""
    import os
    import subprocess
    import sys
    flags = ["--model", tiny, "--demonstration", "none", "--input", str(corpus_gz), "--output", str(tmp_path / "two.npy")]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(C.Path(E.__file__)), *flags], env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("sentences/s in") == 1                       # rank 0 says it
    want = E.Embedder(tiny, demonstrations=[]).encode(LINES)
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), want, atol=1e-5, rtol=0)


def _worker(rank, tiny, init, src, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    emb, calls = E.Embedder(tiny, batch_size=4), []
    encode = emb.encode

    def stop_after_one(sentences, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(sentences))
        return encode(sentences, **kw)
    emb.encode = stop_after_one
    try:
        C.embed_file(emb, src, out, chunk=4)
    except KeyboardInterrupt:
        pass
    dist.barrier()                                      # both stopped after their first chunk; the same run again:
    emb.encode = lambda sentences, **kw: calls.append(len(sentences)) or encode(sentences, **kw)
    C.embed_file(emb, src, out, chunk=4)
    torch.save(calls, f"{out}.calls.{rank}")
    dist.destroy_process_group()


def test_two_gloo_processes_resume_per_shard_and_equal_one(tiny, tmp_path):
    src, one, two = tmp_path / "corpus.txt", tmp_path / "one.npy", tmp_path / "two.npy"
    src.write_text("\n".join(LINES) + "\n")
    C.embed_file(E.Embedder(tiny, batch_size=4), src, one, chunk=4)
    mp.spawn(_worker, args=(tiny, tmp_path / "pg", src, two), nprocs=2)
    np.testing.assert_allclose(np.load(two), np.load(one), atol=1e-5, rtol=0)
    for rank in (0, 1):   # 10 chunks: 5 per rank, 1 before the interruption and 4 after it
        assert torch.load(f"{two}.calls.{rank}") == [4] * 5


def test_plan_placement():
    assert C.plan_placement([10] * 6, [100, 100]) == [0] * 6
    assert C.plan_placement([10] * 6, [25, 40]) == [0, 0, 1, 1, 1, 1]
    assert C.plan_placement([10, 30, 10], [15, 30, 20]) == [0, 1, 2]
    with pytest.raises(UserError, match="the model's blocks need 0.0 GiB and the 2 GPUs have"):
        C.plan_placement([10] * 6, [25, 30])
    with pytest.raises(UserError, match="and the 0 GPUs have"):
        C.plan_placement([10], [])


def test_a_placed_model_equals_the_unplaced_one(tiny):
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu", "cpu"]
    emb = E.Embedder(tiny, demonstrations=[("A jockey riding a horse.", "Equestrian")], batch_size=4)
    want = emb.encode(LINES)
    C.place(emb.model, [torch.device(d) for d in devices])          # the cached prefix moves with the hooks
    assert {str(p.device.type) for p in emb.model.model.layers[1].parameters()} == {devices[1]}
    np.testing.assert_allclose(emb.encode(LINES), want, atol=1e-5, rtol=0)
