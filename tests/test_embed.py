"""embed.py: Embedder equals the prompteol reference, prompts as the reference code renders them, prefix cache,
padding invariance, bad input (one line, nothing half-written)."""
import functools
import json
import os
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
import model as M
from support import corpus, hub
from support.cli import UserError, cli
from test_model import LLAMA_GQA, OPT_PRE, hf_model, save

ROOT = Path(__file__).resolve().parents[1]
SENTS = ["A man plays a guitar.", "Someone is playing music", "Is a woman slicing an onion?",
         'He said "hi" to me', "two  spaces", "x", "Bonjour, ça va ? 123456 ..."]
DEMO = [("A jockey riding a horse.", "Equestrian")]
embedder = functools.partial(E.Embedder, dtype="float32")   # tolerances below are float32's, on any CPU


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
    assert E.preprocess('He said "hi"') == "He said 'hi'"      # ends in a quote: no period, quotes swapped
    assert E.preprocess("ok.") == "ok." and E.preprocess("") == "" and E.preprocess("  ") == ""
    assert E.preprocess(" A man plays \n") == "A man plays." and E.preprocess('"hi" ') == "'hi'"


@pytest.mark.parametrize("demos,max_tokens", [([], None), (DEMO, None), (DEMO, 3)])
def test_encode_equals_the_prompteol_reference(tiny, demos, max_tokens):
    e = embedder(tiny, demonstrations=demos, max_tokens=max_tokens, batch_size=3)   # 7 sentences: 3 batches
    assert all(hit for _, hit in e.tokenize(SENTS))                 # every sentence goes through the prefix cache
    want = E.prompteol(e.model, e.tok, SENTS, demos, max_tokens).numpy()
    np.testing.assert_allclose(e.encode(SENTS), want, atol=1e-5, rtol=0)


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
    assert len(e.tok.encode(text, bos=False)) <= empty + 8 + 2      # + the period, + a boundary merge
    e.encode(["word " * 500, "short"])
    assert e.stats["truncated"] == 1


@pytest.mark.parametrize("template,pooling", [("eol", "last"), ("prompt", "last"), ("none", "last"), ("none", "mean")])
def test_batch_composition_never_changes_an_embedding(tiny, template, pooling):
    e = embedder(tiny, template=template, pooling=pooling, batch_size=3)
    together = e.encode(SENTS)
    alone = np.stack([e.encode([s])[0] for s in SENTS])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(e.encode(SENTS[::-1])[::-1], together, atol=1e-5, rtol=0)


def test_prefix_cache_equals_full_sequence(tiny):
    e = embedder(tiny, demonstrations=[("A jockey riding a horse.", "Equestrian")], batch_size=4)
    assert e.prefix_text.endswith("This sentence :")
    cached = e.encode(SENTS)
    with torch.no_grad():
        for s, got in zip(SENTS, cached):
            ids = torch.tensor([e.tok.encode(e.prompt(s)[0])])
            full = e.model(ids)[0, -1].numpy()
            assert np.abs(full - got).max() <= 1e-4
            assert full @ got / np.linalg.norm(full) / np.linalg.norm(got) >= 0.99999


def test_with_demonstrations_shares_the_model(tiny):
    demo = [("A jockey riding a horse.", "Equestrian")]
    base = embedder(tiny, demonstrations=[])
    other = base.with_demonstrations(demo)
    assert other.model is base.model and other.fingerprint != base.fingerprint
    np.testing.assert_allclose(other.encode(SENTS), embedder(tiny, demonstrations=demo).encode(SENTS), atol=1e-6)
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
    assert e.prefix_ids == []                                       # the mean covers the whole prompt: no cache
    got = e.encode(["a b c d e f", "a"])
    ids = e.tok.encode(e.prompt("a")[0])
    with torch.no_grad():
        h = e.model(torch.tensor([ids]))[0]
    keep = [i for i, t in enumerate(ids) if t != e.tok.bos_id]
    np.testing.assert_allclose(got[1], h[keep].mean(0).numpy(), atol=1e-5, rtol=0)


def test_fingerprint_keeps_the_keys_existing_caches_are_named_by(tiny_llama):
    fp = embedder(tiny_llama, demonstrations=DEMO).fingerprint
    assert sorted(fp) == ["adapter", "adapter_sha256", "bits", "demonstrations", "dtype", "max_tokens", "model",
                          "pooling", "template", "version", "weights"]
    assert fp["dtype"] == "torch.float32" and fp["demonstrations"] == [list(DEMO[0])] and fp["version"] == 3


def test_default_demonstration_follows_the_alias_or_its_hub_id():   # the paper's Table 8 pick for OPT-2.7B
    jockey = [("A jockey riding a horse.", "Equestrian")]
    assert E.default_demonstrations("opt-2.7b") == E.default_demonstrations("facebook/opt-2.7b") == jockey
    assert E.default_demonstrations("someone/model") == []


def test_default_demonstration_is_the_aliases_own_but_not_with_an_adapter(tiny, monkeypatch):
    monkeypatch.setattr(E, "default_demonstrations", lambda name: [("A man is smoking.", "Smoking")])
    assert embedder(tiny).demonstrations == [("A man is smoking.", "Smoking")]
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


def test_non_string_sentence_is_named_by_index_and_type(tiny_llama):
    with pytest.raises(UserError) as err:
        embedder(tiny_llama).encode(["a", "b", b"bytes"])
    assert str(err.value) == "encode takes strings: sentences[2] is of type bytes"


@pytest.mark.parametrize("demos", [("A sentence.", "Word"), [("only a sentence",)], [("s", 1)], ["s=>w"]])
def test_malformed_demonstrations(tiny_llama, demos):
    message = f"demonstrations must be a list of (sentence, word) pairs of strings, not {demos!r:.80}"
    with pytest.raises(UserError) as err:
        embedder(tiny_llama, demonstrations=demos)
    assert str(err.value) == message
    with pytest.raises(UserError) as err:
        embedder(tiny_llama, demonstrations=[]).with_demonstrations(demos)
    assert str(err.value) == message


def test_empty_sentence_with_no_token_to_pool_is_an_error(tiny):
    with pytest.raises(UserError) as err:       # mean pooling never counts BOS
        embedder(tiny, template="none", pooling="mean").encode(["a", "", "b", ""])
    assert str(err.value) == ("empty sentence at line 2, 4 (counting from 1): template 'none' and mean pooling leave "
                              "it no token to pool; drop empty lines or choose a template")
    last = embedder(tiny, template="none")            # this tokenizer adds BOS: the empty sentence is BOS's state
    with torch.no_grad():
        bos = last.model(torch.tensor([[last.tok.bos_id]]))[0, -1].numpy()
    np.testing.assert_allclose(last.encode([""])[0], bos, atol=1e-6, rtol=0)
    assert np.abs(embedder(tiny).encode([""])).sum() > 0    # a template gives an empty sentence tokens


# ----------------------------------------------------------------------------- CLI
def run(args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "embed.py"), *args], input=stdin, capture_output=True,
                          cwd=ROOT, timeout=300)


def run_inprocess(args, capsys):
    """embed.main through common.cli in this process (no torch import per case): -> (exit code, stdout, stderr)."""
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
        code, _, err = run_inprocess(["--model", tiny, "--dtype", "float32", "--input", str(inp),
                                      "--output", str(tmp_path / f"o.{ext}")], capsys)
        assert code == 0, err
        assert "3 sentences" in err and "sentences/s in float32" in err and f"-> {tmp_path}/o.{ext}" in err
    assert np.load(tmp_path / "o.npy").shape[0] == 3
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["sentence"] for r in rows] == ["first sentence", "", "third one"]
    from safetensors.numpy import load_file
    np.testing.assert_allclose(load_file(str(tmp_path / "o.safetensors"))["embeddings"], np.load(tmp_path / "o.npy"))
    code, out, _ = run_inprocess(["--model", tiny, "a cat", "a dog"], capsys)
    assert code == 0 and out.count("\n") == 2 and " 1.000" in out


def test_cli_stdin_error_is_one_line_in_a_real_process():
    r = run(["--model", "no-such-model"], stdin=b"a sentence\n")
    err = r.stderr.decode().strip()
    assert r.returncode == 1 and err == ("embed.py: error: unknown model 'no-such-model': not a local directory, an "
                                         f"alias ({', '.join(hub.ALIASES)}) or a Hugging Face repo id (owner/name)"), err


def test_stdin_splits_lines_as_an_input_file_does(tmp_path):
    text = "form\x0cfeed\r\nline\u2028separator\n\nnext\x85line\nno newline at the end"   # str.splitlines: 8
    (tmp_path / "in.txt").write_bytes(text.encode())
    from_file = [line for _, chunk in corpus.read_chunks(tmp_path / "in.txt", 2) for line in chunk]
    r = subprocess.run([sys.executable, "-c", "import embed, json; print(json.dumps(embed.read_stdin()))"],
                       input=text.encode(), capture_output=True, cwd=ROOT, timeout=300)
    assert json.loads(r.stdout) == from_file == ["form\x0cfeed", "line\u2028separator", "", "next\x85line",
                                                 "no newline at the end"]

@pytest.mark.parametrize("args,message", [
    (["--input", "{tmp}/latin1.txt", "--output", "{tmp}/o.npy"],
     "{tmp}/latin1.txt line 1 is not UTF-8: convert it, e.g. iconv -f latin1 -t utf-8"),
    (["--input", "{tmp}/empty.txt", "--output", "{tmp}/o.npy"], "{tmp}/empty.txt is empty: nothing to embed"),
    (["--input", "{tmp}/missing.txt", "--output", "{tmp}/o.npy"],
     "cannot read {tmp}/missing.txt: No such file or directory"),
    (["--input", "{tmp}/in.txt"],
     "no --output: pass --output FILE (.npy, .safetensors or .jsonl) to keep the embeddings"),
    (["--output", "{tmp}/nodir/x.npy", "a"], "--output {tmp}/nodir/x.npy: its folder does not exist"),
    (["--output", "{tmp}/dir.npy", "a"], "--output {tmp}/dir.npy: is a directory"),
    (["--output", "{tmp}/x.csv", "a"], "--output {tmp}/x.csv: use a .npy, .safetensors or .jsonl file name"),
    (["--model", "no-such-model", "a"], "unknown model 'no-such-model': not a local directory, an alias ("
     + ", ".join(hub.ALIASES) + ") or a Hugging Face repo id (owner/name)"),
    (["--demonstration", "x=>y", "--demonstration", "none", "a"],
     "--demonstration 'none': expected \"SENTENCE=>WORD\" or none"),
    (["--demonstration", "no arrow", "a"], "--demonstration 'no arrow': expected \"SENTENCE=>WORD\" or none"),
    (["--device", "nosuch", "a"], "--device 'nosuch': not a device; use cpu, cuda or cuda:N"),
    (["--template", "none", "--input", "{tmp}/gaps.txt", "--output", "{tmp}/o.npy"],   # no BOS: nothing to pool
     "empty sentence at line 2, 4 (counting from 1): template 'none' and last pooling leave it no token to pool; "
     "drop empty lines or choose a template"),
])
def test_cli_errors_are_one_line(no_bos, tmp_path, args, message, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "in.txt").write_text("a\n")
    (tmp_path / "gaps.txt").write_text("first\n\nthird\n\n")
    (tmp_path / "dir.npy").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, _, err = run_inprocess(args if "--model" in args else ["--model", no_bos] + args, capsys)
    assert code == 1 and err == "sentemb: error: " + message.replace("{tmp}", str(tmp_path)) + "\n", err
    assert not (tmp_path / "o.npy").exists()


def test_cuda_on_a_cpu_only_torch_is_one_line(tiny_llama, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_inprocess(["--model", tiny_llama, "--device", "cuda", "a"], capsys)
    assert code == 1 and err == (f"sentemb: error: --device cuda: this torch has no CUDA device ({torch.__version__});"
                                 " use --device cpu\n")


def test_a_failed_write_leaves_no_partial_file_and_the_old_one_untouched(tiny_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o.npy"

    def disk_full(f, array):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "save", disk_full)
    for old in (None, b"old"):
        if old:
            out.write_bytes(old)
        code, _, err = run_inprocess(["--model", tiny_llama, "--output", str(out), "a", "b"], capsys)
        assert code == 1 and err == (f"sentemb: error: cannot write {out}: No space left on device; "
                                     "nothing was written\n")
        assert os.listdir(tmp_path) == (["o.npy"] if old else []) and (not old or out.read_bytes() == old)


def test_ctrl_c_is_one_line_and_leaves_the_old_output(tiny_llama, tmp_path):
    fifo, out = tmp_path / "in.fifo", tmp_path / "o.npy"
    os.mkfifo(fifo)
    out.write_bytes(b"old")
    p = subprocess.Popen([sys.executable, str(ROOT / "embed.py"), "--model", tiny_llama, "--input", str(fifo),
                          "--output", str(out)], stderr=subprocess.PIPE, cwd=ROOT)
    for _ in range(3000):   # the FIFO opens for writing once embed.py has opened it to read its input
        try:
            w = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert p.poll() is None, p.stderr.read().decode()
            time.sleep(0.1)
    p.send_signal(signal.SIGINT)                 # while embed.py waits for lines
    err = p.communicate(timeout=120)[1].decode()
    os.close(w)
    assert p.returncode == 130 and err == "embed.py: interrupted; nothing was written (an existing --output file is " \
        "untouched)\n", err
    assert out.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["in.fifo", "o.npy"]


# ----------------------------------------------------------------------------- the real default model
@pytest.fixture(scope="module")
def smol():
    try:
        return embedder("smollm2-135m", demonstrations=DEMO, batch_size=4)
    except ValueError as e:
        pytest.skip(f"default model unavailable: {e}")


def test_default_model_matches_transformers(smol):
    """Cached-prefix PromptEOL embeddings == transformers' LlamaModel on the full left-padded prompts."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.LlamaModel.from_pretrained(str(hub.resolve("smollm2-135m")), dtype=torch.float32).eval()
    ids, mask = smol.tok.pad([smol.tok.encode(smol.prompt(s)[0]) for s in SENTS])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   output_hidden_states=True).hidden_states[-1][:, -1].numpy()
    got = smol.encode(SENTS)
    assert all(hit for _, hit in smol.tokenize(SENTS))        # every sentence used the cached prefix
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99999, cos
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
