"""support/corpus.py: a streamed file equals Embedder.encode; progress and the resume record advance
per batch, and a re-run continues exactly; 2 gloo processes (spawned, and under torchrun) equal one;
the GPU placement plan and hooks; --device auto without a GPU."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import embed as E
from support import corpus as C
from support.cli import UserError

LINES = [f"Sentence number {i} is {'long ' * (i % 7)}here." for i in range(37)]
LINES += ["", "  ", "Ça va? «oui»"]
DEMO = [("A jockey riding a horse.", "Equestrian")]
LAST_TOKEN = E.last_token   # the real one, for the tests that count or stop its calls

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny matrices run best on 1 thread


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # helpers imports transformers: only here, not in spawned workers
    from helpers import LLAMA_GQA, hf_model, save
    d = tmp_path_factory.mktemp("tiny")
    save(hf_model(LLAMA_GQA), d)
    return str(d)


@pytest.fixture(scope="module")
def emb(tiny):
    # float32: a streamed file batches rows unlike one encode call, so they agree to float32's error
    return E.Embedder(tiny, demonstrations=DEMO, batch_size=4, dtype="float32")


@pytest.fixture
def corpus_gz(tmp_path):
    p = tmp_path / "corpus.txt.gz"
    # a BOM, CRLF, no final newline
    p.write_bytes(gzip.compress(("\ufeff" + "\r\n".join(LINES)).encode()))
    return p


def test_npy_equals_encode_and_leaves_nothing_else(emb, corpus_gz, tmp_path):
    out = tmp_path / "emb.npy"
    st = C.embed_file(emb, corpus_gz, out, chunk=8)
    assert st["rows"] == st["embedded"] == len(LINES) and st["rank"] == 0
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
    got = load_file(str(tmp_path / "e.safetensors"))["embeddings"]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def interrupt_after(monkeypatch, n):
    """Ctrl-C in the forward pass of batch n + 1: -> the sizes of the batches that ran."""
    calls = []

    def counting(model, tok, prompts, past=None):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(len(prompts))
        return LAST_TOKEN(model, tok, prompts, past)
    monkeypatch.setattr(E, "last_token", counting)
    return calls


def record_of(out):
    record, = out.parent.glob(out.name + ".*.progress.0.json")
    return json.loads(record.read_text())


def test_an_interrupted_run_keeps_every_finished_batch_and_resumes_exactly(
        emb, corpus_gz, tmp_path, monkeypatch, capsys):
    # 40 rows in chunks of 16 and batches of 4: stopped in the 7th batch, the 3rd of chunk 1
    whole = tmp_path / "whole.npy"
    C.embed_file(emb, corpus_gz, whole, chunk=16)
    out = tmp_path / "emb.npy"
    assert C.kept(out) is None                              # no record of this process yet
    interrupt_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        C.embed_file(emb, corpus_gz, out, chunk=16)
    assert C.kept(out) == f"24 of {len(LINES)} rows done; re-run the command to resume"
    record = record_of(out)
    assert not out.exists() and (record["done"], record["batches"], record["kept"]) == (1, 2, 24)
    calls = interrupt_after(monkeypatch, 99)
    assert C.embed_file(emb, corpus_gz, out, chunk=16)["embedded"] == len(LINES) - 24
    assert calls == [4, 4, 4, 4]              # the last 2 batches of chunk 1, the 2 of chunk 2
    np.testing.assert_array_equal(np.load(out), np.load(whole))   # the same batches, bit for bit
    assert "afresh" not in capsys.readouterr().err


def test_another_command_starts_afresh(emb, corpus_gz, tmp_path, monkeypatch, capsys):
    out = tmp_path / "emb.npy"
    interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        C.embed_file(emb, corpus_gz, out, chunk=8)
    calls = interrupt_after(monkeypatch, 99)
    C.embed_file(emb, corpus_gz, out, normalize=True, chunk=8)
    assert "emb.npy: the partial run there is another command's" in capsys.readouterr().err
    assert len(calls) == 10                   # every batch again
    np.testing.assert_allclose(np.load(out), emb.encode(LINES, normalize=True), atol=1e-5, rtol=0)


def test_progress_and_the_record_advance_per_batch(emb, corpus_gz, tmp_path, monkeypatch):
    """The bar moves, and the record counts the rows kept, after every batch, not every chunk."""
    seen = []
    out = tmp_path / "emb.npy"

    class Bar:
        def __init__(self, total, initial, **kw):
            seen.append(("total", total, initial))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            seen.append(("update", n, record_of(out)["kept"]))
    monkeypatch.setattr(C, "tqdm", Bar)
    C.embed_file(emb, corpus_gz, out, chunk=16, progress=True)
    kept = [4 * k for k in range(1, 11)]
    assert seen == [("total", 40, 0)] + [("update", 4, k) for k in kept]


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
    args = ["--model", tiny, "--demonstration", "none", "--input", str(corpus_gz),
            "--output", str(out)]
    assert E.main(args) is None
    err = capsys.readouterr().err
    assert f"{len(LINES)} sentences, {len(LINES)} embedded by this run in" in err
    assert "sentences/s in " in err and f" -> {out}" in err
    assert np.load(out).shape == (len(LINES), 64)


def test_setup_leaves_auto_to_the_embedder_and_checks_other_devices(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert C.setup("auto") == "auto" and C.setup("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="--device 'nosuch': not a device"):
        C.setup("nosuch")


@pytest.mark.slow
def test_torchrun_cli_equals_one_process(tiny, corpus_gz, tmp_path):
    """Under torchrun (gloo, CPU) with one chunk for two ranks: rank 1 has nothing to do and waits
    for rank 0."""
    flags = ["--model", tiny, "--demonstration", "none", "--dtype", "float32",
             "--input", str(corpus_gz), "--output", str(tmp_path / "two.npy")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2"]
    r = subprocess.run([*torchrun, str(Path(E.__file__)), *flags], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("sentences/s in") == 1                       # rank 0 says it
    want = E.Embedder(tiny, demonstrations=[], dtype="float32").encode(LINES)
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), want, atol=1e-5, rtol=0)


def _worker(rank, tiny, init, src, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    emb = E.Embedder(tiny, batch_size=4, dtype="float32")
    calls = []
    real = E.last_token

    def stop_after_one(model, tok, prompts, past=None):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(prompts))
        return real(model, tok, prompts, past)
    E.last_token = stop_after_one
    try:
        C.embed_file(emb, src, out, chunk=8)
    except KeyboardInterrupt:
        pass
    dist.barrier()                     # both stopped after the first batch of their first chunk
    calls.clear()

    def counting(model, tok, prompts, past=None):
        calls.append(len(prompts))
        return real(model, tok, prompts, past)
    E.last_token = counting
    C.embed_file(emb, src, out, chunk=8)          # the same run again
    torch.save(calls, f"{out}.calls.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_resume_per_shard_and_equal_one(tiny, tmp_path):
    src = tmp_path / "corpus.txt"
    one = tmp_path / "one.npy"
    two = tmp_path / "two.npy"
    src.write_text("\n".join(LINES) + "\n")
    C.embed_file(E.Embedder(tiny, batch_size=4, dtype="float32"), src, one, chunk=8)
    mp.spawn(_worker, args=(tiny, tmp_path / "pg", src, two), nprocs=2)
    np.testing.assert_array_equal(np.load(two), np.load(one))   # the same batches, bit for bit
    # 5 chunks of 2 batches: rank 0 has chunks 0, 2, 4 and rank 1 chunks 1, 3; one batch each ran
    # before the interruption
    assert torch.load(f"{two}.calls.0") == [4] * 5
    assert torch.load(f"{two}.calls.1") == [4] * 3


def test_plan_placement():
    assert C.plan_placement([10] * 6, [100, 100]) == [0] * 6
    assert C.plan_placement([10] * 6, [25, 40]) == [0, 0, 1, 1, 1, 1]
    assert C.plan_placement([10, 30, 10], [15, 30, 20]) == [0, 1, 2]
    with pytest.raises(UserError, match="the model's blocks need 0.0 GiB and the 2 GPUs have"):
        C.plan_placement([10] * 6, [25, 30])
    with pytest.raises(UserError, match="and the 0 GPUs have"):
        C.plan_placement([10], [])


def test_spread_plans_the_blocks_over_the_gpus_free_memory(emb, monkeypatch):
    """Two GPUs with room for one block each (after the embeddings and norms on GPU 0)."""
    model = emb.model
    blocks = C.blocks_of(model)
    block = C.nbytes(blocks[0])
    rest = C.nbytes(model) - C.nbytes(blocks)
    free = [(rest + block) / 0.9 + 8, block / 0.9 + 8]      # spread keeps 10% for activations
    placed = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 2 * free[i]))
    monkeypatch.setattr(C, "place", lambda model, devices: placed.append(devices))
    C.spread(model)
    assert placed == [[torch.device("cuda", 0), torch.device("cuda", 1)]]


def test_spread_without_a_gpu_says_so_in_one_line(emb, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    C.spread(emb.model)
    assert capsys.readouterr().err == "--device auto: no GPU found; running on the CPU in float32\n"
    assert {p.device.type for p in emb.model.parameters()} == {"cpu"}


def test_place_hooks_every_block_and_leaves_the_embeddings_unchanged(tiny):
    """On one device the hooks move nothing, but they run in every block and change no number."""
    emb = E.Embedder(tiny, demonstrations=DEMO, batch_size=4, dtype="float32")
    want = emb.encode(LINES)
    blocks = C.blocks_of(emb.model)
    C.place(emb.model, [torch.device("cpu")] * len(blocks))   # the cached prefix goes through them
    assert all(len(b._forward_pre_hooks) == 1 for b in blocks)
    assert len(blocks[-1]._forward_hooks) == 1
    np.testing.assert_array_equal(emb.encode(LINES), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_placed_over_cpu_and_cuda_equals_the_unplaced_one(tiny):
    emb = E.Embedder(tiny, demonstrations=DEMO, batch_size=4, dtype="float32", device="cpu")
    want = emb.encode(LINES)
    C.place(emb.model, [torch.device("cpu"), torch.device("cuda")])
    assert {p.device.type for p in C.blocks_of(emb.model)[1].parameters()} == {"cuda"}
    np.testing.assert_allclose(emb.encode(LINES), want, atol=1e-5, rtol=0)
