"""train_cse.py: the loss by hand; gradient caching == backprop (fp32, with some or all first-pass
graphs kept, and a 4-bit base across an evaluation); 2 gloo processes == 1 process (the functions,
and the CLI under torchrun); exact resume with the checkpoint's recipe; Ctrl-C and NaN stops; the
final adapter saved before the final evaluation; the schedule; best adapter and STS-B dev as
evaluate.py scores it; malformed csv; several --data files and the default data; training
embeddings == inference's. Tiny random models in float32, one CPU thread,
tests/fixtures/nli_triplets.csv."""
import functools
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import lora as L
import model as M
import train_cse as T
from support import nli, tokenizer
from conftest import FIXTURES

LLAMA = dict(model_type="llama", vocab_size=400, hidden_size=64, num_hidden_layers=2,
             intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024, tie_word_embeddings=False)
NLI = str(FIXTURES / "nli_triplets.csv")      # 24 SimCSE triplets
STS = str(FIXTURES / "data")                  # an 8-pair STS-B dev


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny matrices, one thread is best


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers import hf_model, save      # imports transformers: here, not in spawned workers
    d = tmp_path_factory.mktemp("tiny")
    save(hf_model(LLAMA), d)
    return str(d)


def lora_model(path, r=8, dropout=0.0, seed=0):
    m = M.load(path, dtype=torch.float32, device="cpu")
    tok = tokenizer.load(path, m.config)
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
    lengths = torch.randint(3, 14, (n,), generator=g)
    return [torch.randint(4, 400, (int(k),), generator=g).tolist() for k in lengths]


def plain_step(model, chunks, temp):
    """The reference: plain backpropagation, every chunk's graph kept until one backward."""
    parts = [T.embed_chunk(model, ids, mask) for _, ids, mask in chunks]
    local = torch.cat(parts)[torch.argsort(torch.cat([rows for rows, _, _ in chunks]))]
    loss = T.batch_loss(local, temp)
    loss.backward()
    return loss.detach()


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- loss, schedule
def test_loss_hand_computed():
    s = 1 / math.sqrt(2)
    z = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]],        # x1, x1+, x1-
                      [[0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])      # x2, x2+, x2-
    # cosines: row 1: x1.(x1+, x2+, x1-, x2-) = (1, s, 0, -1); row 2: x2.(...) = (0, s, 1, 0)
    row1 = [1, s, 0, -1]
    row2 = [0, s, 1, 0]
    want = (-math.log(math.exp(20 * row1[0]) / sum(math.exp(20 * c) for c in row1))
            - math.log(math.exp(20 * row2[1]) / sum(math.exp(20 * c) for c in row2))) / 2
    assert T.contrastive_loss(z, 0.05).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("warmup,total", [(1, 1), (0, 1), (3, 10), (100, 1077)])
def test_schedule_never_runs_at_lr_zero(warmup, total):
    f = [T.warmup_then_decay(warmup, total)(s) for s in range(total)]
    assert all(0 < x <= 1 for x in f)
    assert warmup >= total or f[warmup] == 1                          # the peak after the warmup
    assert f[:warmup + 1] == sorted(f[:warmup + 1])
    assert f[warmup:] == sorted(f[warmup:], reverse=True)


# ----------------------------------------------------------------------------- gradient caching
def test_gradient_cache_equals_backprop_with_dropout(tiny):
    model, tok = lora_model(tiny, dropout=0.1)
    chunks = T.make_chunks(tok, random_ids(18, 1), 4, torch.device("cpu"))  # 6 triplets, 5 chunks
    runs = {}
    for name, step, seed in (("plain", plain_step, 7), ("cached", T.cached_step, 7),
                             ("other", plain_step, 8)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss = step(model, chunks, 0.05)
        runs[name] = loss, grads(model), torch.get_rng_state()
    assert runs["cached"][0].item() == pytest.approx(runs["plain"][0].item(), rel=1e-6)
    assert rel(runs["cached"][1], runs["plain"][1]) < 1e-5
    assert torch.equal(runs["cached"][2], runs["plain"][2])   # the replay leaves the stream as is
    assert rel(runs["other"][1], runs["plain"][1]) > 1e-3     # other dropout masks: not vacuous


def test_kept_graphs_skip_their_replay_and_change_nothing(tiny):
    """First-pass graphs within the budget are kept: their chunks run once, the others twice, and
    the loss, gradients and random stream are plain backprop's (all kept: plain backprop)."""
    model, tok = lora_model(tiny, dropout=0.1)
    chunks = T.make_chunks(tok, random_ids(18, 1), 4, torch.device("cpu"))  # 6 triplets, 5 chunks
    saved = T.SavedBytes(model)
    with saved:
        T.embed_chunk(model, chunks[0][1], chunks[0][2])              # the longest chunk's graph
    assert saved.total > 0
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    runs = {}
    for name, budget in (("plain", None), ("some", 2.5 * saved.total), ("all", 2.0**60)):
        model.zero_grad(set_to_none=True)
        calls.clear()
        torch.manual_seed(7)
        step = plain_step if budget is None else functools.partial(T.cached_step, budget=budget)
        loss = step(model, chunks, 0.05)
        runs[name] = loss, grads(model), torch.get_rng_state(), len(calls)
    hook.remove()
    assert runs["all"][3] == len(chunks)                              # no chunk replayed
    assert len(chunks) < runs["some"][3] < 2 * len(chunks)            # some replayed
    for name in ("some", "all"):
        assert runs[name][0].item() == pytest.approx(runs["plain"][0].item(), rel=1e-6)
        assert rel(runs[name][1], runs["plain"][1]) < 1e-5
        assert torch.equal(runs[name][2], runs["plain"][2])


def test_4bit_base_evaluation_between_steps_changes_nothing(tiny):
    """QLoRA's default path: an evaluation (eval mode, no grad) between steps must leave the 4-bit
    base as it was (bitsandbytes' CPU repacking round trip is lossy) and gradient caching exact."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit
    q = M.load(tiny, dtype=torch.float32, device="cpu", bits=4)
    tok = tokenizer.load(tiny, q.config)
    L.mark_only_lora_trainable(L.add_lora(q, r=8, alpha=16, dropout=0.1))
    trained = {k: v for k, v in lora_model(tiny)[0].state_dict().items() if "lora_" in k}
    q.load_state_dict(trained, strict=False)
    lin = q.model.layers[1].mlp.down_proj.base_layer
    w0 = dequantize_4bit(lin.weight.data, lin.weight.quant_state).clone()
    chunks = T.make_chunks(tok, random_ids(18, 3), 4, torch.device("cpu"))
    runs = []
    for step in (T.cached_step, plain_step):
        with torch.inference_mode():
            q.eval()(chunks[0][1], chunks[0][2])
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
    for name, step in (("cached", T.cached_step), ("plain", plain_step)):
        model.zero_grad(set_to_none=True)
        loss = step(model, T.make_chunks(tok, ids, 5, torch.device("cpu")), 0.05)
        T.sum_gradients([p for p in model.parameters() if p.requires_grad])
        result[name] = loss, grads(model)
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tiny, tmp_path):
    mp.spawn(_ddp_worker, args=(tiny, tmp_path / "pg", tmp_path / "res"), nprocs=2)
    model, tok = lora_model(tiny)
    chunks = T.make_chunks(tok, random_ids(24, 2), 5, torch.device("cpu"))
    loss = T.cached_step(model, chunks, 0.05)
    want = grads(model)
    for rank in (0, 1):
        got = torch.load(f"{tmp_path / 'res'}.{rank}")
        for name in ("cached", "plain"):
            assert got[name][0].item() == pytest.approx(loss.item(), rel=1e-6), (rank, name)
            assert rel(got[name][1], want) < 1e-5, (rank, name)


# ----------------------------------------------------------------------------- CLI: resume, stops
def args(tiny, data, out, *extra):
    return ["--model", tiny, "--bits", "none", "--dtype", "float32", "--data", data,
            "--output", str(out), "--batch-size", "4", "--chunk-size", "5", "--lora-r", "8",
            "--eval-every", "0", *extra]


def adapter(d):
    from safetensors.torch import load_file
    return load_file(str(d / "adapter_model.safetensors"))


def log(d):
    return [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]


def test_resume_is_exact_with_the_checkpoints_recipe(tiny, tmp_path, monkeypatch, capsys):
    # 20 triplets (and a malformed row) in batches of 4: step 3 is mid-epoch, step 6 in epoch 2
    lines = T.Path(NLI).read_text().splitlines()
    data = tmp_path / "nli.csv"
    data.write_text("\n".join(lines[:12] + ["a malformed row,"] + lines[12:21]) + "\n")

    def run(out, *extra):
        flags = ["--max-steps", "6", "--epochs", "2", "--save-every", "3", "--lr", "1e-3", *extra]
        return T.main(args(tiny, str(data), tmp_path / out, *flags))
    assert run("a") == 0
    save = T.save_checkpoint

    def crash_after_save(*a, **kw):                # Ctrl-C right after the step-3 checkpoint
        save(*a, **kw)
        raise KeyboardInterrupt
    monkeypatch.setattr(T, "save_checkpoint", crash_after_save)
    capsys.readouterr()
    assert run("b") == 130
    b = tmp_path / "b"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sentemb: interrupted; after step 3, saving checkpoint-3, checkpoint-3 in {b} is kept: "
        f"continue with --resume {b}")
    monkeypatch.undo()
    assert (b / "latest").read_text().strip() == "checkpoint-3" and not (b / "final").exists()
    assert T.main(["--resume", str(b)]) == 0           # the recipe (lr, batch, steps...): the run's
    # the same values given explicitly, another --output and --save-every: accepted
    assert T.main(["--resume", str(b / "checkpoint-3"), "--lr", "0.001", "--batch-size", "4",
                   "--output", str(tmp_path / "c"), "--save-every", "1"]) == 0
    final_a = adapter(tmp_path / "a" / "final")
    for d in (b, tmp_path / "c"):
        got = adapter(d / "final")
        assert got.keys() == final_a.keys() and all(torch.equal(got[k], final_a[k]) for k in got), d
    losses = [[r["loss"] for r in log(tmp_path / d) if "loss" in r] for d in "ab"]
    assert losses[0] == losses[1] and len(set(losses[0])) == 6
    start = log(tmp_path / "a")[0]
    assert start["data"][0]["malformed_lines"] == [13] and start["steps_per_epoch"] == 5
    assert [r["epoch"] for r in log(b) if "loss" in r] == [1, 1, 1, 1, 1, 2]
    # a recipe flag given with another value is refused, in one line naming it
    capsys.readouterr()
    assert T.main(["--resume", str(b / "checkpoint-3"), "--lr", "1e-4", "--eval-every", "5"]) == 1
    assert capsys.readouterr().err == (f"sentemb: error: --resume {b / 'checkpoint-3'}: the run "
                                       f"was started otherwise: --lr 0.0001 (the run's: 0.001)\n")
    # the final adapter is what embed.py loads
    from embed import Embedder
    e = Embedder(tiny, demonstrations=[], adapter=str(tmp_path / "a" / "final"), dtype="float32")
    assert e.encode(["A man plays a guitar."]).shape == (1, 64)


def test_ctrl_c_before_the_first_checkpoint_leaves_a_folder_a_rerun_accepts(tiny, tmp_path,
                                                                            monkeypatch, capsys):
    calls = []
    real = T.cached_step

    def interrupt_second(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(T, "cached_step", interrupt_second)
    flags = args(tiny, NLI, tmp_path, "--max-steps", "3", "--save-every", "5")
    assert T.main(flags) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"sentemb: interrupted; in step 2, no checkpoint yet: the same "
                                    f"command starts {tmp_path} over")
    assert "Traceback" not in err
    monkeypatch.undo()
    assert T.main(flags) == 0
    assert [r["step"] for r in log(tmp_path) if "loss" in r] == [1, 2, 3]        # a fresh log
    assert T.main(flags) == 1                                           # a finished run stays
    assert "holds a run" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    calls = []
    real = T.contrastive_loss

    def nan_on_third(z, temp):
        calls.append(1)
        return real(z, temp) * (float("nan") if len(calls) == 3 else 1.0)
    monkeypatch.setattr(T, "contrastive_loss", nan_on_third)
    assert T.main(args(tiny, NLI, tmp_path, "--max-steps", "5", "--save-every", "2")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]            # (after the progress bar)
    assert err.startswith("sentemb: error: loss nan, gradient norm 0.0 at step 3: stopped before "
                          "updating")
    assert "checkpoint-2" in err
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-2"
    assert not (tmp_path / "final").exists()
    assert (tmp_path / "checkpoint-2" / "adapter" / "adapter_model.safetensors").exists()
    assert log(tmp_path)[-1]["event"] == "stopped"


def test_first_step_trains_estimates_and_checkpoints_by_time(tiny, tmp_path, capsys):
    assert T.main(args(tiny, NLI, tmp_path / "one", "--max-steps", "1")) == 0
    assert log(tmp_path / "one")[1]["lr"] > 0                  # --max-steps 1 trains at lr > 0
    trained = adapter(tmp_path / "one" / "final")
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
    err = capsys.readouterr().err
    assert f"24 triplets, 4 a step: step 1 took 0 s -> {tmp_path / 'one'}" in err   # no "0 left"
    assert f"{NLI}: 24 triplets\n" in err                              # the run's data, first
    assert T.main(args(tiny, NLI, tmp_path / "t", "--max-steps", "3", "--save-every", "0",
                       "--save-minutes", "1e-9")) == 0
    assert (tmp_path / "t" / "latest").read_text().strip() == "checkpoint-2"     # one by time
    assert "step 1 took 0 s; the 2 steps left take about 0 min" in capsys.readouterr().err


def test_the_final_adapter_is_saved_before_the_final_evaluation(tiny, tmp_path, monkeypatch,
                                                               capsys):
    """Ctrl-C in the end-of-run STS-B dev evaluation keeps final/; the evaluation shows a bar."""
    import evaluate

    def interrupted(enc, data=None):
        enc.encode(["a sentence", "another"])
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "stsb_dev", interrupted)
    out = tmp_path / "run"
    assert T.main(args(tiny, NLI, out, "--max-steps", "1", "--eval-every", "5",
                       "--data-dir", STS)) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"sentemb: interrupted; in the STS-B dev evaluation after "
                                    f"step 1, the adapter of step 1 is kept in {out / 'final'}")
    assert "STS-B dev, step 1" in err                                   # the progress bar
    assert (out / "final" / "adapter_model.safetensors").exists()


def test_the_default_precision_is_sentemb_dtype(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SENTEMB_DTYPE", "bfloat16")
    flags = args(tiny, NLI, tmp_path, "--max-steps", "1")
    i = flags.index("--dtype")
    assert T.main(flags[:i] + flags[i + 2:]) == 0
    assert log(tmp_path)[0]["args"]["dtype"] == "bfloat16"


def test_best_adapter_by_stsb_dev(tiny, tmp_path, monkeypatch):
    import evaluate
    scores = iter([0.5, 0.4])

    def stub(enc, data=None):
        enc.encode(["x"])
        return next(scores)
    monkeypatch.setattr(evaluate, "stsb_dev", stub)
    out = tmp_path / "run"
    assert T.main(args(tiny, NLI, out, "--max-steps", "4", "--eval-every", "2",
                       "--data-dir", STS)) == 0
    assert [(r["step"], r["best"]) for r in log(out) if "stsb_dev" in r] == [(2, True), (4, False)]
    best = adapter(out / "best")
    final = adapter(out / "final")
    assert any(not torch.equal(best[k], final[k]) for k in best)


def test_stsb_dev_during_training_is_evaluate_pys(tiny, tmp_path):
    import evaluate
    from embed import Embedder
    assert T.main(args(tiny, NLI, tmp_path, "--max-steps", "2", "--eval-every", "2",
                       "--data-dir", STS)) == 0
    logged = [r["stsb_dev"] for r in log(tmp_path) if "stsb_dev" in r]
    e = Embedder(tiny, demonstrations=[], adapter=str(tmp_path / "best"), dtype="float32",
                 device="cpu")
    assert logged == [pytest.approx(evaluate.stsb_dev(e, data=STS), abs=1e-5)]


# ----------------------------------------------------------------------------- data, prompts, flags
def test_malformed_rows_are_skipped_with_line_numbers(tmp_path, capsys, tiny):
    p = tmp_path / "x.csv"
    p.write_text('sent0,sent1,hard_neg\na,b,c\n"multi\nline",b,c\nonly,two\n\na, ,c\nd,e,f,g\n'
                 'h,i,j\n')
    triplets, bad, _ = nli.read_triplets(p)
    assert triplets == [("a", "b", "c"), ("multi\nline", "b", "c"), ("h", "i", "j")]
    assert bad == [5, 7, 8]
    for text, msg in (("s1,s2,s3\na,b,c\n", "expected sent0,sent1,hard_neg"),
                      ("", "header is empty"),
                      ("sent0,sent1,hard_neg\n,,\n", "no valid triplet"),
                      (b"sent0,sent1,hard_neg\n\xff,b,c\n", ":2: not UTF-8")):
        if isinstance(text, bytes):
            p.write_bytes(text)
        else:
            p.write_text(text)
        with pytest.raises(T.UserError, match=msg):
            nli.read_triplets(p)
    capsys.readouterr()
    flags = ["--data", str(p), "--model", tiny, "--eval-every", "0", "--output", str(tmp_path)]
    assert T.main(flags) == 1
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(T.UserError, match="no such file"):
        nli.read_triplets(tmp_path / "missing.csv")


def test_several_data_files_are_joined_each_checked_and_hashed(tiny, tmp_path, capsys):
    lines = T.Path(NLI).read_text().splitlines()
    first = tmp_path / "a.csv"
    second = tmp_path / "b.csv"
    first.write_text("\n".join(lines[:9]) + "\n")                      # 8 triplets
    second.write_text("\n".join(lines[:1] + lines[9:]) + "\n")         # 16 triplets
    out = tmp_path / "run"
    flags = args(tiny, str(first), out, "--max-steps", "6", "--save-every", "2")
    flags[flags.index("--data") + 1:flags.index("--data") + 2] = [str(first), str(second)]
    assert T.main(flags) == 0
    data = log(out)[0]["data"]
    assert [(f["path"], f["triplets"]) for f in data] == [(str(first), 8), (str(second), 16)]
    assert [f["sha256"] for f in data] == [hashlib.sha256(p.read_bytes()).hexdigest()
                                           for p in (first, second)]
    assert log(out)[0]["steps_per_epoch"] == 6                         # 24 triplets, 4 a step
    err = capsys.readouterr().err
    assert f"{first}: 8 triplets\n{second}: 16 triplets\n" in err and "24 triplets, 4 a step" in err
    trainer = torch.load(out / "checkpoint-4" / "trainer.pt", weights_only=True)
    assert trainer["data_sha256"] == [f["sha256"] for f in data]
    # a resumed run must see the same files
    assert T.main(["--resume", str(out), "--data", str(first)]) == 1
    assert "the run had 1 process(es) and data of sha256" in capsys.readouterr().err
    # every file's header is checked
    second.write_text("premise,entailment,contradiction\na,b,c\n")
    with pytest.raises(T.UserError, match=f"^{second}: the header is premise"):
        nli.read_files([str(first), str(second)])


def test_without_data_the_full_file_else_every_partial_file(tmp_path, capsys):
    folder = tmp_path / "nli"
    folder.mkdir()
    rows = T.Path(NLI).read_text().splitlines()
    for name, part in (("nli_triplets_partial.csv", rows[:5]), ("nli_triplets_more.csv", rows[:3])):
        (folder / name).write_text("\n".join(part) + "\n")
    paths = nli.default_files(str(tmp_path))
    names = ["nli_triplets_more.csv", "nli_triplets_partial.csv"]
    assert paths == [str(folder / name) for name in names]
    triplets, files = nli.read_files(paths)
    assert len(triplets) == 6 and [f["triplets"] for f in files] == [2, 4]
    assert capsys.readouterr().err.count(" triplets\n") == 2            # the run says which
    (folder / "nli_for_simcse.csv").write_text("\n".join(rows) + "\n")
    paths = nli.default_files(str(tmp_path))
    assert paths == [str(folder / "nli_for_simcse.csv")]
    assert len(nli.read_files(paths, say=False)[0]) == 24
    assert capsys.readouterr().err == ""                                # (say=False: quiet)


def test_without_data_the_shared_partial_files(data_root):
    folder = data_root / "nli"
    if not folder.is_dir() or (folder / "nli_for_simcse.csv").exists():
        pytest.skip("no nli/ folder, or SimCSE's full file is there")
    paths = nli.default_files(str(data_root))
    triplets, _ = nli.read_files(paths, say=False)
    assert paths == [str(p) for p in sorted(folder.glob("nli_triplets_*.csv"))]
    assert str(folder / "nli_triplets_partial.csv") in paths and len(triplets) >= 8364


def test_training_embeddings_are_inferences(tiny):
    """Training's prompts and embeddings (embed.render, chunks, the last token) == embed.prompteol
    == Embedder, in float32."""
    from embed import Embedder, prompteol, render
    e = Embedder(tiny, demonstrations=[], max_tokens=8, dtype="float32")
    sents = ["A man plays a guitar", 'He said "hi"?', "word " * 40]
    ids = [e.tok.encode(render(e.tok, s, "eol", "", 8)[0]) for s in sents]
    chunks = T.make_chunks(e.tok, ids, 2, torch.device("cpu"))
    with torch.no_grad():
        parts = [T.embed_chunk(e.model, t, m) for _, t, m in chunks]
    got = torch.cat(parts)[torch.argsort(torch.cat([rows for rows, _, _ in chunks]))]
    want = prompteol(e.model, e.tok, sents, max_tokens=8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, torch.from_numpy(e.encode(sents)), atol=1e-5, rtol=1e-5)
    # training's prompts skip evaluation's clean-up, as the reference's training does
    assert [render(e.tok, s, "eol", clean=False)[0] for s in sents[:2]] == [
        'This sentence : "A man plays a guitar" means in one word:"',
        'This sentence : "He said "hi"?" means in one word:"']


def test_every_flag_and_the_parser_have_help():
    p = T.parser()
    assert p.description and all(a.help for a in p._actions)
    assert p.get_default("max_tokens") == 32 and p.get_default("bits") == "4"
    device = next(a for a in p._actions if "--device" in a.option_strings)
    assert "auto" not in device.help                                    # (embed.py's alone)


def test_device_auto_is_refused_in_one_line(tiny, tmp_path, capsys):
    assert T.main(args(tiny, NLI, tmp_path, "--device", "auto")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device 'auto'" in err


@pytest.mark.slow
def test_torchrun_two_processes_train_like_one(tiny, tmp_path):
    """The CLI under torchrun (gloo): same losses and adapter as one process on the same global
    batches."""
    flags = args(tiny, NLI, tmp_path / "ddp", "--max-steps", "2", "--save-every", "1",
                 "--lora-dropout", "0")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(T.Path(T.__file__)), *flags],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-6000:]   # (a rank's own error, then torchrun's)
    assert T.main(args(tiny, NLI, tmp_path / "one", *flags[flags.index("--max-steps"):])) == 0
    logs = [log(tmp_path / d) for d in ("ddp", "one")]
    assert logs[0][0]["world_size"] == 2 and logs[1][0]["world_size"] == 1
    steps = [[r for r in lg if "loss" in r] for lg in logs]
    for a, b in zip(*steps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # the gradients' SUM
    a = adapter(tmp_path / "ddp" / "final")
    b = adapter(tmp_path / "one" / "final")
    assert max(rel(a[k], b[k]) for k in a) < 1e-4   # (Adam makes a rounding-level gradient a step)
    rngs = torch.load(tmp_path / "ddp" / "checkpoint-1" / "trainer.pt", weights_only=True)["rng"]
    assert len(rngs) == 2
