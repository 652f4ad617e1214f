"""embed.py: Embedder.encode equals the prompteol reference (through the same last_token), prompts
as the reference code renders them, prefix cache, padding invariance, --device auto, bad input (one
line, nothing half-written), Ctrl-C (one line; the same command continues)."""
import functools
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import embed as E
from support import corpus, hub
from support.cli import UserError, cli
from helpers import LLAMA_GQA, OPT_PRE, hf_model, save

ROOT = Path(__file__).resolve().parents[1]
SENTS = ["A man plays a guitar.", "Someone is playing music", "Is a woman slicing an onion?",
         'He said "hi" to me', "two  spaces", "x", "Bonjour, ça va ? 123456 ..."]
DEMO = [("A jockey riding a horse.", "Equestrian")]
# Tolerances below are float32's, on any CPU.
embedder = functools.partial(E.Embedder, dtype="float32")
LAST_TOKEN = E.last_token


def assert_same_vectors(got, want, dtype: str):
    """float32: equal to float error; bfloat16 (8-bit mantissa): a cached prefix rounds otherwise
    than the full prompt, so within 2% of the largest value and a cosine of at least 0.999."""
    got = np.asarray(got, dtype=np.float32)
    want = np.asarray(want, dtype=np.float32)
    scale = max(1.0, float(np.abs(want).max()))
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    rel, min_cos = (1e-5, 0.99999) if dtype == "float32" else (0.02, 0.999)
    assert np.abs(got - want).max() <= rel * scale, np.abs(got - want).max()
    assert cos.min() >= min_cos, cos


@pytest.fixture(scope="module", params=["llama", "opt"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    save(hf_model(LLAMA_GQA if request.param == "llama" else OPT_PRE), d)
    return str(d)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    save(hf_model(LLAMA_GQA), d)
    return str(d)


def test_reference_preprocessing():
    assert E.preprocess("A man plays") == "A man plays."
    assert E.preprocess("Is it?") == "Is it."
    # ends in a quote: no period, quotes swapped
    assert E.preprocess('He said "hi"') == "He said 'hi'"
    assert E.preprocess("ok.") == "ok." and E.preprocess("") == "" and E.preprocess("  ") == ""
    assert E.preprocess(" A man plays \n") == "A man plays." and E.preprocess('"hi" ') == "'hi'"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("demos,max_tokens", [([], None), (DEMO, None), (DEMO, 3)])
def test_encode_equals_the_prompteol_reference(tiny, demos, max_tokens, dtype):
    # 7 sentences: 3 batches
    e = E.Embedder(tiny, demonstrations=demos, max_tokens=max_tokens, batch_size=3, dtype=dtype)
    assert all(hit for _, hit in e.tokenize(SENTS))    # every sentence continues the cached prefix
    want = E.prompteol(e.model, e.tok, SENTS, demos, max_tokens)
    assert want.dtype == getattr(torch, dtype)
    assert_same_vectors(e.encode(SENTS), want.float().numpy(), dtype)


def test_encode_runs_prompteols_last_token(tiny, monkeypatch):
    """encode's batch step is `last_token`, the step prompteol ends in; only the cached prefix and
    the batching differ."""
    calls = []

    def spy(model, tok, prompts, past=None):
        calls.append((len(prompts), past is not None))
        return LAST_TOKEN(model, tok, prompts, past)
    monkeypatch.setattr(E, "last_token", spy)
    e = embedder(tiny, demonstrations=DEMO, batch_size=3)
    e.encode(SENTS)
    assert calls == [(3, True), (3, True), (1, True)]
    calls.clear()
    E.prompteol(e.model, e.tok, SENTS, DEMO)
    assert calls == [(len(SENTS), False)]


def test_prompt_with_demonstration_is_the_reference_string(tiny):
    e = embedder(tiny, demonstrations=[("A jockey riding a horse.", "Equestrian")])
    text, cut = e.prompt("A man plays a guitar")
    assert text == ('This sentence : "A jockey riding a horse." means in one word:"Equestrian".'
                    'This sentence : "A man plays a guitar." means in one word:"')
    assert not cut
    assert embedder(tiny, template="prompt").prompt("Hi")[0] == 'This sentence : "Hi." means'
    assert embedder(tiny, template="none").prompt("Hi")[0] == "Hi"


def test_truncation_cuts_the_sentence_not_the_template(tiny):
    e = embedder(tiny, max_tokens=8)
    text, cut = e.prompt("word " * 500)
    assert cut and text.endswith('" means in one word:"')
    empty = len(e.tok.encode(e.prompt("")[0], bos=False))
    # + the period, + a boundary merge
    assert len(e.tok.encode(text, bos=False)) <= empty + 8 + 2
    e.encode(["word " * 500, "short"])
    assert e.stats["truncated"] == 1


@pytest.mark.parametrize("template,pooling",
                         [("eol", "last"), ("prompt", "last"), ("none", "last"), ("none", "mean")])
def test_batch_composition_never_changes_an_embedding(tiny, template, pooling):
    e = embedder(tiny, template=template, pooling=pooling, batch_size=3)
    together = e.encode(SENTS)
    alone = np.stack([e.encode([s])[0] for s in SENTS])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(e.encode(SENTS[::-1])[::-1], together, atol=1e-5, rtol=0)


def test_prefix_cache_equals_full_sequence(tiny):
    e = embedder(tiny, demonstrations=DEMO, batch_size=4)
    assert e.prefix_text.endswith("This sentence :")
    cached = e.encode(SENTS)
    with torch.no_grad():
        for s, got in zip(SENTS, cached, strict=True):
            ids = torch.tensor([e.tok.encode(e.prompt(s)[0])])
            full = e.model(ids)[0, -1].numpy()
            assert np.abs(full - got).max() <= 1e-4
            assert full @ got / np.linalg.norm(full) / np.linalg.norm(got) >= 0.99999


def test_with_demonstrations_shares_the_model(tiny):
    base = embedder(tiny, demonstrations=[])
    other = base.with_demonstrations(DEMO)
    assert other.model is base.model and other.fingerprint != base.fingerprint
    want = embedder(tiny, demonstrations=DEMO).encode(SENTS)
    np.testing.assert_allclose(other.encode(SENTS), want, atol=1e-6)
    assert base.prefix_ids != other.prefix_ids and base.demonstrations == []


def test_fingerprint_changes_when_the_weights_at_the_same_path_change(tiny_llama, tmp_path):
    # The embedding cache is keyed by the fingerprint: new weights at an old path must not hit it.
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    before = embedder(str(d)).fingerprint
    assert embedder(str(d)).fingerprint == before
    save(hf_model(LLAMA_GQA), d)   # retrained in place
    assert embedder(str(d)).fingerprint != before


@pytest.mark.parametrize("template", ["none", "eol"])
def test_mean_pooling_averages_the_prompt_without_padding_and_bos(tiny, template):
    e = embedder(tiny, template=template, pooling="mean")
    assert e.prefix_ids == []                           # the mean covers the whole prompt: no cache
    got = e.encode(["a b c d e f", "a"])
    ids = e.tok.encode(e.prompt("a")[0])
    with torch.no_grad():
        h = e.model(torch.tensor([ids]))[0]
    keep = [i for i, t in enumerate(ids) if t != e.tok.bos_id]
    np.testing.assert_allclose(got[1], h[keep].mean(0).numpy(), atol=1e-5, rtol=0)


def test_fingerprint_keeps_the_keys_existing_caches_are_named_by(tiny_llama):
    fp = embedder(tiny_llama, demonstrations=DEMO).fingerprint
    assert sorted(fp) == ["adapter", "adapter_sha256", "bits", "demonstrations", "dtype",
                          "max_tokens", "model", "pooling", "template", "version", "weights"]
    assert fp["dtype"] == "torch.float32" and fp["demonstrations"] == [list(DEMO[0])]
    assert fp["version"] == 3


def test_default_demonstration_follows_the_alias_or_its_hub_id():
    jockey = [("A jockey riding a horse.", "Equestrian")]   # the paper's Table 8 pick for OPT-2.7B
    assert E.default_demonstrations("opt-2.7b") == jockey
    assert E.default_demonstrations("facebook/opt-2.7b") == jockey
    assert E.default_demonstrations("someone/model") == []


def test_default_demonstration_is_the_aliases_own_but_not_with_an_adapter(tiny, monkeypatch):
    smoking = [("A man is smoking.", "Smoking")]
    monkeypatch.setattr(E, "default_demonstrations", lambda name: smoking)
    assert embedder(tiny).demonstrations == smoking
    assert embedder(tiny, template="none", pooling="mean").demonstrations == []
    import lora
    monkeypatch.setattr(lora, "load_adapter", lambda model, path: model)
    assert embedder(tiny, adapter="some/adapter").demonstrations == []


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="unknown template 'cls'"):
        embedder(tiny, template="cls")
    with pytest.raises(ValueError, match="demonstrations need the 'eol' template"):
        embedder(tiny, template="none", pooling="mean", demonstrations=[("a", "b")])
    with pytest.raises(ValueError, match="not one string"):
        embedder(tiny).encode("one string")
    # the API names its parameters as it spells them (the CLI names its flags)
    with pytest.raises(UserError, match="^batch_size=0: must be at least 1$"):
        embedder(tiny, batch_size=0)
    with pytest.raises(UserError, match="^max_tokens=-2: must be at least 1$"):
        embedder(tiny, max_tokens=-2)


def test_non_string_sentence_is_named_by_index_and_type(tiny_llama):
    with pytest.raises(UserError) as err:
        embedder(tiny_llama).encode(["a", "b", b"bytes"])
    assert str(err.value) == "encode takes strings: sentences[2] is of type bytes"


@pytest.mark.parametrize("demos", [("A sentence.", "Word"), [("only a sentence",)], [("s", 1)],
                                   ["s=>w"]])
def test_malformed_demonstrations(tiny_llama, demos):
    message = ("demonstrations must be a list of (sentence, word) pairs of strings, "
               f"not {demos!r:.80}")
    with pytest.raises(UserError) as err:
        embedder(tiny_llama, demonstrations=demos)
    assert str(err.value) == message
    with pytest.raises(UserError) as err:
        embedder(tiny_llama, demonstrations=[]).with_demonstrations(demos)
    assert str(err.value) == message


def test_empty_sentence_with_no_token_to_pool_is_an_error(tiny):
    with pytest.raises(UserError) as err:       # mean pooling never counts BOS
        embedder(tiny, template="none", pooling="mean").encode(["a", "", "b", ""])
    assert str(err.value) == ("empty sentence at line 2, 4 (counting from 1): template 'none' and "
                              "mean pooling leave it no token to pool; drop empty lines or choose "
                              "a template")
    # This tokenizer adds BOS: with no template the empty sentence is BOS's state.
    last = embedder(tiny, template="none")
    with torch.no_grad():
        bos = last.model(torch.tensor([[last.tok.bos_id]]))[0, -1].numpy()
    np.testing.assert_allclose(last.encode([""])[0], bos, atol=1e-6, rtol=0)
    # The template gives an empty sentence tokens of its own: PromptEOL's state of `""`.
    eol = embedder(tiny, demonstrations=[])
    assert eol.prompt("")[0] == 'This sentence : "" means in one word:"'
    want = E.prompteol(eol.model, eol.tok, [""]).numpy()
    got = eol.encode([""])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(got[0] - bos).max() > 0.1


# ----------------------------------------------------------------------------- CLI
def run(args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "embed.py"), *args], input=stdin,
                          capture_output=True, cwd=ROOT, timeout=300)


def run_inprocess(args, capsys):
    """embed.main through support.cli.cli in this process (no torch import per case): -> (exit
    code, stdout, stderr)."""
    code = cli(E.main, args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def no_bos(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("nobos") / "m"
    shutil.copytree(tiny_llama, d)
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    return str(d)


def test_cli_outputs_and_summary(tiny, tmp_path, capsys):
    inp = tmp_path / "in.txt"
    inp.write_text("first sentence\n\nthird one\n")
    for ext in ("npy", "safetensors", "jsonl"):
        out = tmp_path / f"o.{ext}"
        code, _, err = run_inprocess(["--model", tiny, "--dtype", "float32", "--input", str(inp),
                                      "--output", str(out)], capsys)
        assert code == 0, err
        assert "3 sentences" in err and "sentences/s in float32" in err and f"-> {out}" in err
    assert np.load(tmp_path / "o.npy").shape[0] == 3
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["sentence"] for r in rows] == ["first sentence", "", "third one"]
    from safetensors.numpy import load_file
    tensors = load_file(str(tmp_path / "o.safetensors"))
    np.testing.assert_allclose(tensors["embeddings"], np.load(tmp_path / "o.npy"))
    # --data-dir is accepted as by every script, and unused
    code, out, _ = run_inprocess(["--model", tiny, "--data-dir", str(tmp_path / "nowhere"),
                                  "a cat", "a dog"], capsys)
    assert code == 0 and out.count("\n") == 2 and " 1.000" in out


def test_help_lists_device_auto_and_says_data_dir_is_unused():
    text = " ".join(E.parser().format_help().split())
    assert ("--device DEVICE cpu, cuda, cuda:N, or auto: the model's blocks spread over all GPUs, "
            "or the CPU where there is none") in text
    assert "--data-dir DATA_DIR accepted, as by every script; embed.py reads no data folder" in text
    assert text.count("--device DEVICE") == 2 and text.count("--data-dir DATA_DIR") == 2


@pytest.mark.parametrize("mode", ["quick", "stdin", "input"])
def test_device_auto_without_a_gpu_runs_on_the_cpu_and_says_so(tiny_llama, tmp_path, monkeypatch,
                                                               capsys, mode):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(sys, "stdin", io.StringIO())       # not a terminal
    monkeypatch.setattr(E, "read_stdin", lambda: ["a cat", "a dog"])
    inp = tmp_path / "in.txt"
    inp.write_text("a cat\na dog\n")
    given = {"quick": ["a cat", "a dog"], "stdin": [], "input": ["--input", str(inp)]}[mode]
    vecs = {}
    for dev in ("auto", "cpu"):
        out = tmp_path / f"{dev}.npy"
        args = ["--model", tiny_llama, "--dtype", "float32", "--device", dev, "--output", str(out)]
        code, _, err = run_inprocess(args + given, capsys)
        assert code == 0, err
        said = [line for line in err.splitlines() if line.startswith("--device auto")]
        assert said == (["--device auto: no GPU found; running on the CPU in float32"]
                        if dev == "auto" else [])
        vecs[dev] = np.load(out)
    assert vecs["auto"].shape == (2, 64)
    np.testing.assert_array_equal(vecs["auto"], vecs["cpu"])


def test_cli_stdin_error_is_one_line_in_a_real_process():
    r = run(["--model", "no-such-model"], stdin=b"a sentence\n")
    err = r.stderr.decode().strip()
    assert r.returncode == 1, err
    assert err == ("embed.py: error: unknown model 'no-such-model': not a local directory, an "
                   f"alias ({', '.join(hub.ALIASES)}) or a Hugging Face repo id (owner/name)")


def test_stdin_splits_lines_as_an_input_file_does(tmp_path):
    # str.splitlines would make 8 lines of it
    text = "form\x0cfeed\r\nline\u2028separator\n\nnext\x85line\nno newline at the end"
    (tmp_path / "in.txt").write_bytes(text.encode())
    chunks = corpus.read_chunks(tmp_path / "in.txt", 2)
    from_file = [line for _, chunk in chunks for line in chunk]
    read = "import embed, json; print(json.dumps(embed.read_stdin()))"
    r = subprocess.run([sys.executable, "-c", read], input=text.encode(), capture_output=True,
                       cwd=ROOT, timeout=300)
    assert json.loads(r.stdout) == from_file
    assert from_file == ["form\x0cfeed", "line\u2028separator", "", "next\x85line",
                         "no newline at the end"]


@pytest.mark.parametrize("args,message", [
    (["--input", "{tmp}/latin1.txt", "--output", "{tmp}/o.npy"],
     "{tmp}/latin1.txt line 1 is not UTF-8: convert it, e.g. iconv -f latin1 -t utf-8"),
    (["--input", "{tmp}/empty.txt", "--output", "{tmp}/o.npy"],
     "{tmp}/empty.txt is empty: nothing to embed"),
    (["--input", "{tmp}/missing.txt", "--output", "{tmp}/o.npy"],
     "cannot read {tmp}/missing.txt: No such file or directory"),
    (["--input", "{tmp}/in.txt"],
     "no --output: pass --output FILE (.npy, .safetensors or .jsonl) to keep the embeddings"),
    (["--output", "{tmp}/nodir/x.npy", "a"],
     "--output {tmp}/nodir/x.npy: its folder does not exist"),
    (["--output", "{tmp}/dir.npy", "a"], "--output {tmp}/dir.npy: is a directory"),
    (["--output", "{tmp}/x.csv", "a"],
     "--output {tmp}/x.csv: use a .npy, .safetensors or .jsonl file name"),
    (["--model", "no-such-model", "a"], "unknown model 'no-such-model': not a local directory, an "
     "alias (" + ", ".join(hub.ALIASES) + ") or a Hugging Face repo id (owner/name)"),
    (["--demonstration", "x=>y", "--demonstration", "none", "a"],
     "--demonstration 'none': expected \"SENTENCE=>WORD\" or none"),
    (["--demonstration", "no arrow", "a"],
     "--demonstration 'no arrow': expected \"SENTENCE=>WORD\" or none"),
    (["--device", "nosuch", "a"], "--device 'nosuch': not a device; use cpu, cuda or cuda:N"),
    (["--batch-size", "0", "a"], "--batch-size 0: must be at least 1"),
    (["--max-tokens", "-1", "--input", "{tmp}/in.txt", "--output", "{tmp}/o.npy"],
     "--max-tokens -1: must be at least 1"),
    # no BOS: nothing to pool
    (["--template", "none", "--input", "{tmp}/gaps.txt", "--output", "{tmp}/o.npy"],
     "empty sentence at line 2, 4 (counting from 1): template 'none' and last pooling leave it no "
     "token to pool; drop empty lines or choose a template"),
])
def test_cli_errors_are_one_line(no_bos, tmp_path, args, message, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "in.txt").write_text("a\n")
    (tmp_path / "gaps.txt").write_text("first\n\nthird\n\n")
    (tmp_path / "dir.npy").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, _, err = run_inprocess(args if "--model" in args else ["--model", no_bos] + args, capsys)
    want = "sentemb: error: " + message.replace("{tmp}", str(tmp_path)) + "\n"
    assert code == 1 and err == want, err
    assert not (tmp_path / "o.npy").exists()


def test_cuda_on_a_cpu_only_torch_is_one_line(tiny_llama, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_inprocess(["--model", tiny_llama, "--device", "cuda", "a"], capsys)
    assert code == 1 and err == ("sentemb: error: --device cuda: this torch has no CUDA device "
                                 f"({torch.__version__}); use --device cpu\n")


def test_a_failed_write_leaves_no_partial_file_and_the_old_one_untouched(tiny_llama, tmp_path,
                                                                         monkeypatch, capsys):
    out = tmp_path / "o.npy"

    def disk_full(f, array):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "save", disk_full)
    for old in (None, b"old"):
        if old:
            out.write_bytes(old)
        args = ["--model", tiny_llama, "--output", str(out), "a", "b"]
        code, _, err = run_inprocess(args, capsys)
        assert code == 1 and err == (f"sentemb: error: cannot write {out}: No space left on "
                                     "device; nothing was written\n")
        assert os.listdir(tmp_path) == (["o.npy"] if old else [])
        assert not old or out.read_bytes() == old


def messages(err: str) -> list[str]:
    """stderr's lines but the progress bar's (tqdm redraws with \\r)."""
    return [line for line in re.split(r"[\r\n]", err) if line.strip() and "|" not in line]


def test_ctrl_c_is_one_line_and_leaves_the_old_output(tiny_llama, tmp_path):
    fifo = tmp_path / "in.fifo"
    out = tmp_path / "o.npy"
    os.mkfifo(fifo)
    out.write_bytes(b"old")
    p = subprocess.Popen([sys.executable, str(ROOT / "embed.py"), "--model", tiny_llama,
                          "--input", str(fifo), "--output", str(out)],
                         stderr=subprocess.PIPE, cwd=ROOT)
    # The FIFO opens for writing once embed.py has opened it to read its input.
    for _ in range(3000):
        try:
            w = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert p.poll() is None, p.stderr.read().decode()
            time.sleep(0.1)
    p.send_signal(signal.SIGINT)                 # while embed.py waits for lines
    err = p.communicate(timeout=120)[1].decode()
    os.close(w)
    assert p.returncode == 130, err
    assert err == ("embed.py: interrupted; nothing was written (an existing --output file is "
                   "untouched)\n")
    assert out.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["in.fifo", "o.npy"]


@pytest.mark.slow
def test_ctrl_c_mid_file_keeps_the_finished_rows_and_the_same_command_continues(tiny_llama,
                                                                                tmp_path):
    src = tmp_path / "in.txt"
    out = tmp_path / "o.npy"
    lines = [f"sentence {i} " + "word " * (i % 5) for i in range(3000)]
    src.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, str(ROOT / "embed.py"), "--model", tiny_llama, "--dtype", "float32",
           "--demonstration", "none", "--batch-size", "1", "--input", str(src),
           "--output", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    record = None
    for _ in range(6000):                     # until the record counts a row
        found = list(tmp_path.glob("o.npy.*.progress.0.json"))
        if found and json.loads(found[0].read_text())["kept"] > 0:
            record = found[0]
            break
        assert p.poll() is None, p.stderr.read().decode()
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1].decode()
    kept = json.loads(record.read_text())["kept"]
    assert p.returncode == 130 and 0 < kept < len(lines), err
    # one line, the last, and nothing after it
    assert messages(err) == [f"embed.py: interrupted; {kept} of {len(lines)} rows done; re-run the "
                             "command to resume"], err
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    done = f"{len(lines)} sentences, {len(lines) - kept} embedded by this run in "
    assert messages(r.stderr)[-1].startswith(done)
    rows = np.load(out)
    assert np.abs(rows).sum(1).min() > 0          # every row written, the kept ones and the rest
    sample = list(range(0, len(lines), 97))
    want = E.Embedder(tiny_llama, demonstrations=[], batch_size=1, dtype="float32")
    np.testing.assert_allclose(rows[sample], want.encode([lines[i] for i in sample]), atol=1e-5,
                               rtol=0)
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "o.npy"]


# ------------------------------------------------------------------------ the real default model
@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def smol(request):
    """The default model with its default demonstration, in each precision."""
    try:
        return E.Embedder("smollm2-135m", batch_size=3, dtype=request.param)
    except ValueError as e:
        pytest.skip(f"default model unavailable: {e}")


@pytest.mark.slow
def test_default_model_encode_equals_prompteol(smol):
    assert smol.demonstrations      # data/demonstrations.json's pick for the alias
    want = E.prompteol(smol.model, smol.tok, SENTS, smol.demonstrations)
    assert all(hit for _, hit in smol.tokenize(SENTS))    # every sentence used the cached prefix
    dtype = str(smol.dtype).removeprefix("torch.")
    assert_same_vectors(smol.encode(SENTS), want.float().numpy(), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("smol", ["float32"], indirect=True)
def test_default_model_matches_transformers(smol):
    """Cached-prefix PromptEOL embeddings == transformers' LlamaModel on the full left-padded
    prompts, in float32."""
    transformers = pytest.importorskip("transformers")
    path = str(hub.resolve("smollm2-135m"))
    ref = transformers.LlamaModel.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask = smol.tok.pad([smol.tok.encode(smol.prompt(s)[0]) for s in SENTS])
    with torch.no_grad():
        hidden = ref(input_ids=ids, attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True)
    want = hidden.hidden_states[-1][:, -1].numpy()
    assert all(hit for _, hit in smol.tokenize(SENTS))    # every sentence used the cached prefix
    assert_same_vectors(smol.encode(SENTS), want, "float32")
