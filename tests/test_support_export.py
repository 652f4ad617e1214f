"""support/export.py (python lora.py merge): the merged folder loads in transformers, its README
snippet reproduces Embedder(model=M, adapter=A) and Embedder(model=DIR) gives the same vectors; a
4-bit base merges into a float copy; one-line errors and nothing half-written."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import embed as E
import lora as L
import model as M
from conftest import ROOT
from support import export
from support.cli import UserError
from helpers import LLAMA_MHA, OPT_PRE, hf_model, save

transformers = pytest.importorskip("transformers")

# Widths that are multiples of 64, as bitsandbytes' CPU 4-bit kernel needs.
LLAMA = dict(LLAMA_MHA, intermediate_size=128)
CONFIGS = {"llama-tied": LLAMA,
           "llama-untied-gqa": dict(LLAMA, tie_word_embeddings=False, num_key_value_heads=2),
           "opt": dict(OPT_PRE, ffn_dim=128)}
SENTS = ["A man plays a guitar.", "Someone is playing music", 'He said "hi"?', "x",
         "Bonjour, ça va ? 123456 ..."]
DEMO = [("A jockey riding a horse.", "Equestrian")]
LOADERS = dict(load=M.load, load_adapter=L.load_adapter, merge_lora=L.merge_lora)


def trained(tmp, cfg, bits=None, targets="all-linear"):
    """A base checkpoint and a PEFT adapter with random (non-zero) B, as training leaves one."""
    base = tmp / "base"
    save(hf_model(cfg), base)
    m = M.load(base, dtype=torch.float32, device="cpu", bits=bits)
    L.add_lora(m, r=4, targets=targets)
    with torch.no_grad():
        for layer in L._lora_layers(m).values():
            layer.lora_B.weight.normal_(0, 0.05)
    L.save_adapter(m, tmp / "adapter", str(base))
    return base, tmp / "adapter"


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    return trained(tmp_path_factory.mktemp(request.param), CONFIGS[request.param])


def merge(*argv):
    return export.main(["merge", *map(str, argv)], **LOADERS)


def snippet(out):
    """The README's transformers code, run: (its embed function, its model)."""
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)[1]
    scope = {"print": lambda *a: None}
    exec(compile(code, str(out / "README.md"), "exec"), scope)
    return scope["embed"], scope["model"]


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_the_merged_folder_reproduces_the_adapter_in_transformers_and_sentemb(pair, tmp_path):
    base, adapter = pair
    out = tmp_path / "merged"
    assert merge("--model", base, "--adapter", adapter, "--output", out, "--dtype", "float32") == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "sentemb_export.json"} <= names
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    want = E.Embedder(str(base), adapter=str(adapter), dtype="float32").encode(SENTS)
    embed, hf = snippet(out)
    assert type(hf).__name__.endswith("ForCausalLM")
    assert cosines(embed(SENTS).numpy(), want).min() >= 0.9999
    np.testing.assert_allclose(E.Embedder(str(out), dtype="float32").encode(SENTS), want, atol=1e-4)
    plain = E.Embedder(str(base), dtype="float32", demonstrations=[]).encode(SENTS)
    assert cosines(plain, want).min() < 0.999                   # the adapter does change them
    text = (out / "README.md").read_text()
    for said in (str(base), str(adapter), E.TEMPLATES["eol"], "last token", "left padding",
                 "Demonstration: none"):
        assert said in text


def test_a_4bit_base_merges_into_a_float_copy(tmp_path):
    # The layers the adapter leaves alone are dequantized too.
    base, adapter = trained(tmp_path, LLAMA, bits=4, targets=["q_proj", "v_proj"])
    out = tmp_path / "merged"
    merge("--model", base, "--adapter", adapter, "--output", out, "--bits", 4, "--dtype", "float32")
    want = E.Embedder(str(base), adapter=str(adapter), bits=4, dtype="float32").encode(SENTS)
    embed, _ = snippet(out)
    assert cosines(embed(SENTS).numpy(), want).min() >= 0.9999
    assert "4-bit base" in (out / "README.md").read_text()


def test_demonstration_and_shards(tmp_path):
    base, adapter = trained(tmp_path, LLAMA)
    out = tmp_path / "merged"
    export.merge(str(base), str(adapter), out, demonstrations=DEMO, dtype="float32",
                 shard_bytes=50_000, **LOADERS)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert (out / "model.safetensors.index.json").exists()
    want = E.Embedder(str(base), adapter=str(adapter), demonstrations=DEMO, dtype="float32")
    want = want.encode(SENTS)
    embed, _ = snippet(out)
    assert cosines(embed(SENTS).numpy(), want).min() >= 0.9999
    got = E.Embedder(str(out), demonstrations=DEMO, dtype="float32").encode(SENTS)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert "Equestrian" in (out / "README.md").read_text()


def test_the_prompt_constants_are_embeds():
    assert export.TEMPLATES == E.TEMPLATES and export.DEMO_FORMAT == E.DEMO_FORMAT


def test_errors_are_one_line_and_leave_nothing(tmp_path):
    base, adapter = trained(tmp_path / "a", LLAMA)
    other, _ = trained(tmp_path / "b", CONFIGS["opt"])
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not an empty folder"):
        merge("--model", base, "--adapter", adapter, "--output", full)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    out = tmp_path / "out"
    with pytest.raises(UserError, match="does not match this model"):
        merge("--model", other, "--adapter", adapter, "--output", out)
    assert not out.exists() and not list(tmp_path.glob(".out*"))   # no temporary folder left
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="names no base model: pass --model"):
        merge("--adapter", adapter, "--output", out)
    empty = tmp_path / "empty"
    empty.mkdir()                                                # an empty folder is fine
    merge("--model", base, "--adapter", adapter, "--output", empty, "--dtype", "bfloat16")
    cfg = json.loads((empty / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16" and (empty / "README.md").exists()
    saved = load_file(empty / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}


def test_lora_py_merge_command(tmp_path):
    base, adapter = trained(tmp_path, LLAMA)
    out = tmp_path / "merged"
    cmd = [sys.executable, "lora.py", "merge", "--adapter", str(adapter), "--output", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "wrote" in run.stdout, run.stderr[-2000:]   # base: the adapter's
    assert json.loads((out / "sentemb_export.json").read_text())["base"] == str(base)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in again.stderr.splitlines() if "error:" in line]
    assert again.returncode == 1 and len(errors) == 1 and "not an empty folder" in errors[0]
    assert "Traceback" not in again.stderr
