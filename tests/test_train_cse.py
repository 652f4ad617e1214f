"""train_cse.py: the loss by hand; gradient caching == backprop (fp32, and a 4-bit base across an evaluation);
2 gloo processes == 1 process (the functions, and the CLI under torchrun); exact resume; NaN stop; best adapter;
malformed csv; training prompts and embeddings == inference's. Tiny random models, one CPU thread."""
import json
import math

import pytest
import torch
import torch.multiprocessing as mp

import lora as L
import model as M
import train_cse as T

LLAMA = dict(model_type="llama", vocab_size=400, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
NOUNS = ["guitar", "dog", "horse", "onion", "car", "ball", "river", "book", "cake", "phone", "tree", "boat"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: with other jobs on the CPU, a second OpenMP thread makes them ~50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_model import hf_model, save      # imports transformers: only here, not in spawned workers
    d = tmp_path_factory.mktemp("tiny")
    save(hf_model(LLAMA), d)
    return str(d)


@pytest.fixture(scope="module")
def nli_csv(tmp_path_factory):
    rows = ["sent0,sent1,hard_neg"]
    for i in range(24):
        a, b = NOUNS[i % 12], NOUNS[(5 * i + 3) % 12]
        rows.append(f'"A man, {i} years old, holds a {a} near the {b}.",A man holds a {a}.,'
                    f"Nobody is near a {b}" + (" at all today" * (i % 3)))
    p = tmp_path_factory.mktemp("nli") / "nli.csv"
    p.write_text("\n".join(rows) + "\n")
    return str(p)


def lora_model(path, r=8, dropout=0.0, seed=0):
    m, tok = M.load(path, device="cpu")
    torch.manual_seed(seed)
    L.mark_only_lora_trainable(L.add_lora(m, r=r, alpha=16, dropout=dropout))
    with torch.no_grad():                          # B = 0 would make A's gradients vanish
        g = torch.Generator().manual_seed(seed)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.train(), tok


def random_ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 400, (int(k),), generator=g).tolist() for k in torch.randint(3, 14, (n,), generator=g)]


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- the loss
def test_loss_hand_computed():
    s = 1 / math.sqrt(2)
    z = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]],        # x1, x1+, x1-
                      [[0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])      # x2, x2+, x2-
    # cosines: row 1: x1.(x1+, x2+, x1-, x2-) = (1, s, 0, -1); row 2: x2.(...) = (0, s, 1, 0)
    row1, row2 = [1, s, 0, -1], [0, s, 1, 0]
    want = (-math.log(math.exp(20 * row1[0]) / sum(math.exp(20 * c) for c in row1))
            - math.log(math.exp(20 * row2[1]) / sum(math.exp(20 * c) for c in row2))) / 2
    assert T.contrastive_loss(z, 0.05).item() == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- gradient caching
def test_gradient_cache_equals_backprop_with_dropout(tiny):
    model, tok = lora_model(tiny, dropout=0.1)
    chunks = T.make_chunks(tok, random_ids(18, 1), 4, torch.device("cpu"))        # 6 triplets, 5 chunks
    runs = {}
    for name, step, seed in (("plain", T.plain_step, 7), ("cached", T.cached_step, 7), ("other", T.plain_step, 8)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss = step(model, chunks, 0.05)
        runs[name] = loss, grads(model), torch.get_rng_state()
    assert runs["cached"][0].item() == pytest.approx(runs["plain"][0].item(), rel=1e-6)
    assert rel(runs["cached"][1], runs["plain"][1]) < 1e-5
    assert torch.equal(runs["cached"][2], runs["plain"][2])     # the replay leaves the random stream as it was
    assert rel(runs["other"][1], runs["plain"][1]) > 1e-3       # other dropout masks: the check is not vacuous


def test_4bit_base_evaluation_between_steps_changes_nothing(tiny):
    """QLoRA's default path: an evaluation (eval mode, no grad) between steps must leave the 4-bit base as it
    was (bitsandbytes' CPU repacking round trip is lossy) and gradient caching exact."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit
    q, tok = M.load(tiny, device="cpu", bits=4)
    L.mark_only_lora_trainable(L.add_lora(q, r=8, alpha=16, dropout=0.1))
    q.load_state_dict({k: v for k, v in lora_model(tiny)[0].state_dict().items() if "lora_" in k}, strict=False)
    lin = q.model.layers[1].mlp.down_proj.base_layer
    w0 = dequantize_4bit(lin.weight.data, lin.weight.quant_state).clone()
    chunks = T.make_chunks(tok, random_ids(18, 3), 4, torch.device("cpu"))
    runs = []
    for step in (T.cached_step, T.plain_step):
        with torch.inference_mode():
            T.eval_mode(q)(chunks[0][1], chunks[0][2])
        q.train().zero_grad(set_to_none=True)
        torch.manual_seed(5)
        runs.append((step(q, chunks, 0.05), grads(q)))
    assert not getattr(lin.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(dequantize_4bit(lin.weight.data, lin.weight.quant_state), w0)
    assert runs[0][0].item() == pytest.approx(runs[1][0].item(), rel=1e-6)
    assert rel(runs[0][1], runs[1][1]) < 1e-5


def _ddp_worker(rank, path, init, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    model, tok = lora_model(path)
    ids = random_ids(24, 2)[12 * rank:12 * (rank + 1)]                 # 4 of the 8 triplets each
    result = {}
    for name, step in (("cached", T.cached_step), ("plain", T.plain_step)):
        model.zero_grad(set_to_none=True)
        loss = step(model, T.make_chunks(tok, ids, 5, torch.device("cpu")), 0.05)
        T.sum_gradients([p for p in model.parameters() if p.requires_grad])
        result[name] = loss, grads(model)
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tiny, tmp_path):
    mp.spawn(_ddp_worker, args=(tiny, tmp_path / "pg", tmp_path / "res"), nprocs=2)
    model, tok = lora_model(tiny)
    loss = T.cached_step(model, T.make_chunks(tok, random_ids(24, 2), 5, torch.device("cpu")), 0.05)
    want = grads(model)
    for rank in (0, 1):
        got = torch.load(f"{tmp_path / 'res'}.{rank}")
        for name in ("cached", "plain"):
            assert got[name][0].item() == pytest.approx(loss.item(), rel=1e-6), (rank, name)
            assert rel(got[name][1], want) < 1e-5, (rank, name)


# ----------------------------------------------------------------------------- the CLI: resume, NaN, best
def args(tiny, data, out, *extra):
    return ["--model", tiny, "--bits", "32", "--data", data, "--out", str(out), "--batch-size", "4",
            "--chunk-size", "5", "--lora-r", "8", "--eval-every", "0", *extra]


def adapter(d):
    from safetensors.torch import load_file
    return load_file(str(d / "adapter_model.safetensors"))


def test_resume_is_exact(tiny, nli_csv, tmp_path, monkeypatch):
    # 20 triplets (and a malformed row) in batches of 4: step 3 is mid-epoch, steps 6 in the second epoch
    lines = T.Path(nli_csv).read_text().splitlines()
    data = tmp_path / "nli.csv"
    data.write_text("\n".join(lines[:12] + ["a malformed row,"] + lines[12:21]) + "\n")
    run = lambda out, *extra: T.main(args(tiny, str(data), tmp_path / out, "--max-steps", "6", "--epochs", "2",
                                          "--save-every", "3", *extra))  # noqa: E731
    assert run("a") == 0
    save = T.save_checkpoint

    def crash_after_save(*a, **kw):                # the process dies right after the step-3 checkpoint
        save(*a, **kw)
        raise KeyboardInterrupt
    monkeypatch.setattr(T, "save_checkpoint", crash_after_save)
    assert run("b") == 130
    monkeypatch.undo()
    assert (tmp_path / "b" / "latest").read_text().strip() == "checkpoint-3" and not (tmp_path / "b" / "final").exists()
    assert run("b", "--resume", str(tmp_path / "b")) == 0
    a, b = adapter(tmp_path / "a" / "final"), adapter(tmp_path / "b" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
    losses = [[r["loss"] for r in log if "loss" in r] for log in logs]
    assert losses[0] == losses[1] and len(set(losses[0])) == 6
    assert logs[0][0]["malformed_lines"] == [13] and logs[0][0]["steps_per_epoch"] == 5
    assert [r["epoch"] for r in logs[1] if "loss" in r] == [1, 1, 1, 1, 1, 2]
    # a different recipe is refused, in one line
    assert run("b", "--lr", "1e-4", "--resume", str(tmp_path / "b" / "checkpoint-3")) == 1
    # the final adapter is what embed.py loads
    from embed import Embedder
    e = Embedder(tiny, demonstrations=[], adapter=str(tmp_path / "a" / "final"))
    assert e.encode(["A man plays a guitar."]).shape == (1, 64)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny, nli_csv, tmp_path, monkeypatch, capsys):
    real, calls = T.contrastive_loss, []

    def nan_on_third(z, temp):
        calls.append(1)
        return real(z, temp) * (float("nan") if len(calls) == 3 else 1.0)
    monkeypatch.setattr(T, "contrastive_loss", nan_on_third)
    assert T.main(args(tiny, nli_csv, tmp_path, "--max-steps", "5", "--save-every", "2")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]            # (after the progress bar)
    assert err.startswith("train_cse.py: error: loss nan at step 3") and "checkpoint-2" in err
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-2" and not (tmp_path / "final").exists()
    assert (tmp_path / "checkpoint-2" / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["event"] == "stopped"


def test_best_adapter_by_stsb_dev(tiny, nli_csv, tmp_path, monkeypatch):
    import evaluate
    scores = iter([0.5, 0.4])
    monkeypatch.setattr(evaluate, "stsb_dev", lambda enc, data=None: (enc.encode(["x"]), next(scores))[1])
    assert T.main(args(tiny, nli_csv, tmp_path, "--max-steps", "4", "--eval-every", "2")) == 0
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["best"]) for r in log if "stsb_dev" in r] == [(2, True), (4, False)]
    best, final = adapter(tmp_path / "best"), adapter(tmp_path / "final")
    assert any(not torch.equal(best[k], final[k]) for k in best)


# ----------------------------------------------------------------------------- data and prompts
def test_malformed_rows_are_skipped_with_line_numbers(tmp_path, capsys, tiny):
    p = tmp_path / "x.csv"
    p.write_text('sent0,sent1,hard_neg\na,b,c\n"multi\nline",b,c\nonly,two\n\na, ,c\nd,e,f,g\nh,i,j\n')
    triplets, bad = T.read_triplets(p)
    assert triplets == [("a", "b", "c"), ("multi\nline", "b", "c"), ("h", "i", "j")] and bad == [5, 7, 8]
    for text, msg in (("s1,s2,s3\na,b,c\n", "expected SimCSE's sent0,sent1,hard_neg"), ("", "header is empty"),
                      ("sent0,sent1,hard_neg\n,,\n", "no valid triplet"), (b"sent0,sent1,hard_neg\n\xff,b,c\n", ":2: not UTF-8")):
        (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
        with pytest.raises(T.UserError, match=msg):
            T.read_triplets(p)
    assert T.main(["--data", str(p), "--model", tiny, "--eval-every", "0", "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(T.UserError, match="no such file"):
        T.read_triplets(tmp_path / "missing.csv")


def test_training_prompts_and_embeddings_match_inference(tiny):
    from embed import Embedder
    e = Embedder(tiny, demonstrations=[], max_tokens=8)
    sents = ["A man plays a guitar", 'He said "hi"?', "word " * 40]
    ids, cut = T.tokenize(e, sents)
    assert cut == sum(e.prompt(s)[1] for s in sents) >= 1
    assert ids == [e.prefix_ids + rest if hit else rest for rest, hit in e.tokenize(sents)]
    chunks = T.make_chunks(e.tok, ids, 2, torch.device("cpu"))
    with torch.no_grad():
        got = T.assemble([T.embed_chunk(e.model, t, m) for _, t, m in chunks], chunks)
    torch.testing.assert_close(got, torch.from_numpy(e.encode(sents)), atol=1e-5, rtol=1e-5)


def test_torchrun_two_processes_train_like_one(tiny, nli_csv, tmp_path):
    """The CLI under torchrun (gloo): same losses and adapter as one process on the same global batches."""
    import os
    import subprocess
    import sys
    flags = args(tiny, nli_csv, tmp_path / "ddp", "--max-steps", "2", "--save-every", "1", "--lora-dropout", "0")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(T.Path(T.__file__)), *flags], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert T.main(args(tiny, nli_csv, tmp_path / "one", "--max-steps", "2", "--save-every", "1", "--lora-dropout", "0")) == 0
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("ddp", "one")]
    assert logs[0][0]["world_size"] == 2 and logs[1][0]["world_size"] == 1
    for a, b in zip(*[[r for r in log if "loss" in r] for log in logs]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    a, b = adapter(tmp_path / "ddp" / "final"), adapter(tmp_path / "one" / "final")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert len(torch.load(tmp_path / "ddp" / "checkpoint-1" / "trainer.pt", weights_only=True)["rng"]) == 2
