"""model.py against transformers (the reference oracle) on tiny random checkpoints, in float32;
and support.hub, which turns a model name into the directory model.load reads."""
import json

import pytest
import torch

import model as M
from helpers import (CONFIGS, LLAMA_GQA, LLAMA_MHA, MISTRAL, OPT_PRE, QWEN2, _train_bpe,
                     batch, hf_model, ref_hidden, save)
from support import hub
from support.cli import UserError

FP32 = torch.float32      # the parity tests' precision, whatever the machine's default


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    ref = hf_model(cfg)
    d = tmp_path_factory.mktemp(request.param)
    save(ref, d)
    ours = M.load(d, dtype=FP32, device="cpu")
    return cfg, ref, ours, d


def test_hidden_state_parity_left_padded(pair):
    cfg, ref, ours, _ = pair
    _, ids, mask = batch([7, 3, 12, 1])
    want = ref_hidden(cfg, ref, ids, mask)
    with torch.no_grad():
        got = ours(ids, mask)
    real = mask.bool()
    assert got.shape == want.shape
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


def test_lm_logits_parity(pair):
    cfg, ref, ours, _ = pair
    _, ids, mask = batch([5, 9])
    want = ref_hidden(cfg, ref, ids, mask, lm=True)
    with torch.no_grad():
        got = ours.lm_logits(ours(ids, mask))
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)


def test_last_token_same_alone_and_in_padded_batch(pair):
    _, _, ours, _ = pair
    seqs, ids, mask = batch([4, 11, 6], seed=1)
    with torch.no_grad():
        together = ours(ids, mask)[:, -1]
        for i, s in enumerate(seqs):
            alone = ours(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, -1]
            torch.testing.assert_close(together[i], alone, atol=1e-5, rtol=0)


def test_prefix_cache_equals_full_sequence(pair):
    _, _, ours, _ = pair
    prefix = torch.tensor([[5, 6, 7, 8, 9]])
    seqs, ids, mask = batch([3, 8], seed=2)
    with torch.no_grad():
        _, past = ours(prefix, use_cache=True)
        cached = ours(ids, mask, past=past)[:, -1]
        for i, s in enumerate(seqs):
            full = ours(torch.tensor([prefix[0].tolist() + s]))[0, -1]
            torch.testing.assert_close(cached[i], full, atol=1e-5, rtol=0)


def test_module_names_are_hugging_faces(pair):
    """Checkpoints and PEFT adapters map by name: the same state dict keys as transformers'."""
    _, ref, ours, _ = pair
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_llama_mlp_is_swiglu():
    c = M.Config.from_hf(LLAMA_MHA)
    mlp = M.LlamaMLP(c)
    x = torch.randn(2, 3, c.hidden_size)
    gate = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T)
    want = (gate * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), want)


def test_sharded_and_bin_checkpoints(tmp_path):
    ref = hf_model(LLAMA_GQA)
    save(ref, tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a = M.load(tmp_path / "sharded", dtype=FP32)
    # A pickle checkpoint: read with torch.load(weights_only=True).
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(ref.config.to_json_string())
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _train_bpe().save_model(str(tmp_path / "bin"))
    b = M.load(tmp_path / "bin", dtype=FP32)
    _, ids, mask = batch([6, 2])
    with torch.no_grad():
        torch.testing.assert_close(a(ids, mask), b(ids, mask), atol=0, rtol=0)


def test_opt_checkpoint_without_model_prefix(tmp_path):
    # facebook/opt-* were saved from OPTModel: keys start with "decoder.", not "model.decoder."
    ref = hf_model(OPT_PRE)
    save(ref, tmp_path, base_only=True)
    ours = M.load(tmp_path, dtype=FP32)
    _, ids, mask = batch([4, 5])
    with torch.no_grad():
        got = ours(ids, mask)[mask.bool()]
    torch.testing.assert_close(got, ref_hidden(OPT_PRE, ref, ids, mask)[mask.bool()],
                               atol=1e-5, rtol=0)


def test_base_model_checkpoint_embeds_without_lm_head(tmp_path):
    # Embedding checkpoints are often saved from LlamaModel: no "model." prefix, and no lm_head
    # when untied.
    ref = hf_model(LLAMA_GQA)
    save(ref, tmp_path, base_only=True)
    ours = M.load(tmp_path, dtype=FP32)
    _, ids, mask = batch([4, 9])
    with torch.no_grad():
        got = ours(ids, mask)
    want = ref_hidden(LLAMA_GQA, ref, ids, mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)
    with pytest.raises(M.ModelError) as e:
        ours.lm_logits(got)
    assert str(e.value) == (f"{tmp_path} has no LM head (a base-model checkpoint): it embeds, "
                            f"but cannot predict")


def test_sliding_window_past_it_is_an_error(tmp_path):
    # Below the window, the parity tests above show plain causal attention.
    save(hf_model(MISTRAL), tmp_path)
    ours = M.load(tmp_path)
    with pytest.raises(M.ModelError) as e:
        ours(torch.ones(1, 17, dtype=torch.long))
    assert str(e.value) == ("sequence of 17 tokens exceeds this model's 16-token sliding window "
                            "(sentemb implements attention within the window only)")
    _, past = ours(torch.ones(1, 10, dtype=torch.long), use_cache=True)
    with pytest.raises(M.ModelError, match="sequence of 18 tokens"):    # the prefix counts
        ours(torch.ones(2, 8, dtype=torch.long), past=past)


def test_qwen2_windows_only_layers_from_max_window_layers(tmp_path):
    # max_window_layers=2 of 2 layers: no layer is windowed.
    cfg = dict(QWEN2, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    ref = hf_model(cfg)
    save(ref, tmp_path)
    ours = M.load(tmp_path, dtype=FP32)
    _, ids, mask = batch([12, 5])                  # longer than the window: full attention
    with torch.no_grad():
        got = ours(ids, mask)[mask.bool()]
    torch.testing.assert_close(got, ref_hidden(cfg, ref, ids, mask)[mask.bool()],
                               atol=1e-5, rtol=0)
    # With max_window_layers=1, layer 1 is windowed: sequences past the window are refused.
    assert M.Config.from_hf(dict(cfg, max_window_layers=1)).sliding_window == 8


def test_load_takes_the_dtype_it_is_given(tmp_path, monkeypatch):
    save(hf_model(LLAMA_MHA), tmp_path)
    monkeypatch.setenv("SENTEMB_DTYPE", "bfloat16")    # the CLIs' default: model.py ignores it
    assert M.load(tmp_path).embeddings().weight.dtype == torch.float32   # torch's default
    assert M.load(tmp_path, dtype="bfloat16").embeddings().weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- errors
def test_errors(tmp_path):
    with pytest.raises(M.ModelError, match="^/nonexistent/model: no such directory$"):
        M.load("/nonexistent/model")
    with pytest.raises(M.ModelError, match=f"^{tmp_path} has no config.json"):
        M.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(M.ModelError, match="unsupported model_type 'bert'"):
        M.load(tmp_path)
    with pytest.raises(M.ModelError, match="bits must be"):
        M.load(tmp_path, bits=3)
    assert M.ModelError.user_error and issubclass(M.ModelError, ValueError)   # cli() prints it


@pytest.fixture
def tiny_dir(tmp_path):
    save(hf_model(LLAMA_MHA), tmp_path)
    return tmp_path


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_names_the_file(tiny_dir, damage):
    f = tiny_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"not a checkpoint at all")
    with pytest.raises(M.ModelError) as e:
        M.load(tiny_dir)
    if damage == "truncated":
        detail = "incomplete metadata, file not fully covered"
    else:
        detail = "header too large"
    assert str(e.value) == (f"{f} is corrupt or truncated (Error while deserializing header: "
                            f"{detail}): replace it with a good copy (the converted default "
                            f"model: delete its folder, and the next run converts it again)")


def test_invalid_config_json_names_the_file(tiny_dir):
    cfg = tiny_dir / "config.json"
    good = json.loads(cfg.read_text())
    cfg.write_text('{"model_type": "llama",')
    with pytest.raises(M.ModelError) as e:
        M.load(tiny_dir)
    assert str(e.value) == (f"{cfg} is not valid JSON (Expecting property name enclosed in double "
                            f"quotes: line 1 column 24 (char 23)): replace it with a good copy")
    cfg.write_text(json.dumps({k: v for k, v in good.items() if k != "hidden_size"}))
    with pytest.raises(M.ModelError) as e:
        M.load(tiny_dir)
    assert str(e.value) == f"{cfg} has no 'hidden_size': not a complete llama config"


def test_load_places_the_model_on_the_device_it_is_given(tiny_dir):
    # model.load takes a torch device (or its name) as is: a user's --device string is checked
    # by support.cli.device before it gets here (tests/test_support_cli.py).
    devices = ["cpu", torch.device("cpu")] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        m = M.load(tiny_dir, device=device)
        assert {p.device.type for p in m.parameters()} == {torch.device(device).type}


def test_mismatched_checkpoint_lists_problems(tmp_path):
    ref = hf_model(LLAMA_MHA)
    sd = {k: v.clone() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    del sd["model.layers.0.mlp.up_proj.weight"]                     # missing
    sd["model.layers.0.extra.weight"] = torch.zeros(2)               # unexpected
    sd["model.norm.weight"] = torch.zeros(3)                         # mis-shaped
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(ref.config.to_json_string())
    _train_bpe().save_model(str(tmp_path))
    with pytest.raises(M.ModelError) as e:
        M.load(tmp_path)
    msg = str(e.value)
    assert "1 missing: model.layers.0.mlp.up_proj.weight" in msg
    assert "1 unexpected: model.layers.0.extra.weight" in msg
    assert "1 mis-shaped: model.norm.weight (3,) != (64,)" in msg


# ----------------------------------------------------------------------------- support.hub
def test_hub_resolve_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve(str(tmp_path)) == tmp_path                     # a local directory as is
    with pytest.raises(UserError, match="^unknown model 'gpt-9000': not a local directory"):
        hub.resolve("gpt-9000")
    with pytest.raises(UserError, match="^--model /nonexistent/model: no such directory$"):
        hub.resolve("/nonexistent/model")
    with pytest.raises(UserError, match=r"^could not fetch model 'nobody/no-such-model' from the "
                                        r"Hugging Face Hub"):
        hub.resolve("nobody/no-such-model")
