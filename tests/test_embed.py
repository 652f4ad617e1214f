"""embed.py: prompts as the reference renders them, prefix cache, padding invariance, CLI errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import embed as E
import model as M
from test_model import LLAMA_GQA, OPT_PRE, hf_model, save

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SENTS = ["A man plays a guitar.", "Someone is playing music", "Is a woman slicing an onion?",
         'He said "hi" to me', "two  spaces", "x", "Bonjour, ça va ? 123456 ..."]


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
    assert E.preprocess("ok.") == "ok." and E.preprocess("") == ""


def test_prompt_with_demonstration_is_the_reference_string(tiny):
    e = E.Embedder(tiny, demonstrations=[("A jockey riding a horse.", "Equestrian")])
    text, cut = e.prompt("A man plays a guitar")
    assert text == ('This sentence : "A jockey riding a horse." means in one word:"Equestrian".'
                    'This sentence : "A man plays a guitar." means in one word:"')
    assert not cut
    assert E.Embedder(tiny, template="prompt").prompt("Hi")[0] == 'This sentence : "Hi." means'
    assert E.Embedder(tiny, template="none").prompt("Hi")[0] == "Hi"


def test_truncation_cuts_the_sentence_not_the_template(tiny):
    e = E.Embedder(tiny, max_tokens=8)
    text, cut = e.prompt("word " * 500)
    assert cut and text.endswith('" means in one word:"')
    empty = len(e.tok.encode(e.prompt("")[0], bos=False))
    assert len(e.tok.encode(text, bos=False)) <= empty + 8 + 2      # + the period, + a boundary merge
    e.encode(["word " * 500, "short"])
    assert e.stats["truncated"] == 1


@pytest.mark.parametrize("template,pooling", [("eol", "last"), ("prompt", "last"), ("none", "last"), ("none", "mean")])
def test_batch_composition_never_changes_an_embedding(tiny, template, pooling):
    e = E.Embedder(tiny, template=template, pooling=pooling, batch_size=3)
    together = e.encode(SENTS)
    alone = np.stack([e.encode([s])[0] for s in SENTS])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(e.encode(SENTS[::-1])[::-1], together, atol=1e-5, rtol=0)


def test_prefix_cache_equals_full_sequence(tiny):
    e = E.Embedder(tiny, demonstrations=[("A jockey riding a horse.", "Equestrian")], batch_size=4)
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
    base = E.Embedder(tiny, demonstrations=[])
    other = base.with_demonstrations(demo)
    assert other.model is base.model and other.fingerprint != base.fingerprint
    np.testing.assert_allclose(other.encode(SENTS), E.Embedder(tiny, demonstrations=demo).encode(SENTS), atol=1e-6)
    assert base.prefix_ids != other.prefix_ids and base.demonstrations == []


def test_fingerprint_changes_when_the_weights_at_the_same_path_change(tiny_llama, tmp_path):
    # The embedding cache is keyed by the fingerprint: new weights at an old path must not hit it.
    d = tmp_path / "m"
    __import__("shutil").copytree(tiny_llama, d)
    before = E.Embedder(str(d)).fingerprint
    assert E.Embedder(str(d)).fingerprint == before
    save(hf_model(LLAMA_GQA), d)   # retrained in place
    assert E.Embedder(str(d)).fingerprint != before


def test_mean_pooling_ignores_padding_and_bos(tiny):
    e = E.Embedder(tiny, template="none", pooling="mean")
    got = e.encode(["a b c d e f", "a"])
    ids = e.tok.encode("a")
    with torch.no_grad():
        h = e.model(torch.tensor([ids]))[0]
    keep = [i for i, t in enumerate(ids) if t != e.tok.bos_id]
    np.testing.assert_allclose(got[1], h[keep].mean(0).numpy(), atol=1e-5, rtol=0)


def test_default_demonstration_is_the_aliases_own_but_not_with_an_adapter(tiny, monkeypatch):
    monkeypatch.setattr(E, "default_demonstrations", lambda name: [("A man is smoking.", "Smoking")])
    assert E.Embedder(tiny).demonstrations == [("A man is smoking.", "Smoking")]
    assert E.Embedder(tiny, template="none", pooling="mean").demonstrations == []
    import lora
    monkeypatch.setattr(lora, "load_adapter", lambda model, path: model)
    assert E.Embedder(tiny, adapter="some/adapter").demonstrations == []


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="unknown template 'cls'"):
        E.Embedder(tiny, template="cls")
    with pytest.raises(ValueError, match="demonstrations need the 'eol' template"):
        E.Embedder(tiny, template="none", pooling="mean", demonstrations=[("a", "b")])
    with pytest.raises(ValueError, match="not one string"):
        E.Embedder(tiny).encode("one string")


# ----------------------------------------------------------------------------- CLI
def run(args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "embed.py"), *args], input=stdin, capture_output=True,
                          cwd=ROOT, timeout=300)


def run_inprocess(args, capsys):
    """embed.main in this process (no torch import per case): -> (exit code, stdout, stderr)."""
    code = 0
    try:
        E.main(args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_outputs_and_summary(tiny, tmp_path, capsys):
    inp = tmp_path / "in.txt"
    inp.write_text("first sentence\n\nthird one\n")
    for ext in ("npy", "safetensors", "jsonl"):
        code, _, err = run_inprocess(["--model", tiny, "--input", str(inp), "--output", str(tmp_path / f"o.{ext}")],
                                     capsys)
        assert code == 0, err
        assert "3 sentences" in err and "1 empty lines kept as rows" in err
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
    assert r.returncode == 1 and err == "error: unknown model 'no-such-model': not a local directory, an alias (" \
        + ", ".join(M.ALIASES) + ") or a Hugging Face repo id (owner/name)", err


@pytest.mark.parametrize("args,stdin,message", [
    (["--input", "{tmp}/latin1.txt"], None, "is not UTF-8 text (byte 0xe9"),
    (["--input", "{tmp}/empty.txt"], None, "is empty: nothing to embed"),
    (["--input", "{tmp}/missing.txt"], None, "cannot read"),
    (["--output", "{tmp}/nodir/x.npy", "a"], None, "its folder does not exist"),
    (["--output", "{tmp}/x.csv", "a"], None, "use a .npy, .safetensors or .jsonl"),
    (["--model", "no-such-model", "a"], None, "unknown model 'no-such-model'"),
    (["--demonstration", "x=>y", "--demonstration", "none", "a"], None, "'none': expected \"SENTENCE=>WORD\" or none"),
    (["--demonstration", "no arrow", "a"], None, "'no arrow': expected \"SENTENCE=>WORD\" or none"),
])
def test_cli_errors_are_one_line(tiny_llama, tmp_path, args, stdin, message, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--model" not in args:
        args = ["--model", tiny_llama] + args
    code, _, err = run_inprocess(args, capsys)
    err = err.strip()
    assert code == 1 and message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------- the real default model
@pytest.fixture(scope="module")
def smol():
    try:
        return E.Embedder("smollm2-135m", demonstrations=[("A jockey riding a horse.", "Equestrian")], batch_size=4)
    except ValueError as e:
        pytest.skip(f"default model unavailable: {e}")


def test_default_model_matches_transformers(smol):
    """Cached-prefix PromptEOL embeddings == transformers' LlamaModel on the full left-padded prompts."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.LlamaModel.from_pretrained(str(M.resolve("smollm2-135m")), dtype=torch.float32).eval()
    ids, mask = smol.tok.pad([smol.tok.encode(smol.prompt(s)[0]) for s in SENTS])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   output_hidden_states=True).hidden_states[-1][:, -1].numpy()
    got = smol.encode(SENTS)
    assert all(hit for _, hit in smol.tokenize(SENTS))        # every sentence used the cached prefix
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99999, cos
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
