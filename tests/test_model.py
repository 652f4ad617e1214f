"""model.py against transformers (the reference oracle) on tiny random checkpoints."""
import json

import pytest
import torch

import model as M

transformers = pytest.importorskip("transformers")

OPT_PRE = dict(model_type="opt", vocab_size=400, hidden_size=64, num_hidden_layers=2, ffn_dim=96,
               num_attention_heads=4, max_position_embeddings=1024, word_embed_proj_dim=64)
OPT_POST = dict(OPT_PRE, do_layer_norm_before=False, word_embed_proj_dim=32, hidden_size=64)  # opt-350m-like
LLAMA_MHA = dict(model_type="llama", vocab_size=400, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, rope_theta=10000.0,
                 tie_word_embeddings=True)
LLAMA_GQA = dict(LLAMA_MHA, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, rope_theta=100000.0)
CONFIGS = {"opt-pre-ln": OPT_PRE, "opt-post-ln-proj": OPT_POST, "llama-mha": LLAMA_MHA, "llama-gqa-untied": LLAMA_GQA}


def hf_model(cfg: dict):
    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    if cfg["model_type"] == "opt":
        conf = transformers.OPTConfig(**kw)
        conf._remove_final_layer_norm = not kw.get("do_layer_norm_before", True)
        cls = transformers.OPTForCausalLM
    else:
        conf, cls = transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    torch.manual_seed(0)
    m = cls(conf).eval()
    with torch.no_grad():  # random init leaves norms at 1/0 and biases at 0: perturb everything
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    ref = hf_model(cfg)
    d = tmp_path_factory.mktemp(request.param)
    save(ref, d)
    ours, _ = M.load(str(d), device="cpu")
    return cfg, ref, ours, d


def save(ref, d, **kw):
    """A checkpoint directory as on the hub: weights, config.json, and a GPT-2 style tokenizer."""
    (ref.model if kw.pop("base_only", False) else ref).save_pretrained(d, **kw)
    _train_bpe().save_model(str(d))


def batch(lengths, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    T = max(lengths)
    ids = torch.ones(len(seqs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):], mask[i, T - len(s):] = torch.tensor(s), 1
    return seqs, ids, mask


def ref_hidden(cfg, ref, ids, mask, lm=False):
    kw = {}
    if cfg["model_type"] == "llama":  # transformers' LLaMA counts pads unless told the positions
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
    return out.logits if lm else out.hidden_states[-1]


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


def test_sharded_and_bin_checkpoints(tmp_path):
    ref = hf_model(LLAMA_GQA)
    save(ref, tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a, _ = M.load(str(tmp_path / "sharded"))
    # A pickle checkpoint: read with torch.load(weights_only=True).
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(ref.config.to_json_string())
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _train_bpe().save_model(str(tmp_path / "bin"))
    b, _ = M.load(str(tmp_path / "bin"))
    _, ids, mask = batch([6, 2])
    with torch.no_grad():
        torch.testing.assert_close(a(ids, mask), b(ids, mask), atol=0, rtol=0)


def test_opt_checkpoint_without_model_prefix(tmp_path):
    # facebook/opt-* were saved from OPTModel: keys start with "decoder.", not "model.decoder."
    ref = hf_model(OPT_PRE)
    save(ref, tmp_path, base_only=True)
    ours, _ = M.load(str(tmp_path))
    _, ids, mask = batch([4, 5])
    torch.testing.assert_close(ours(ids, mask)[mask.bool()],
                               ref_hidden(OPT_PRE, ref, ids, mask)[mask.bool()], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- errors
def test_errors(tmp_path):
    with pytest.raises(ValueError, match="model directory not found: /nonexistent/model"):
        M.load("/nonexistent/model")
    with pytest.raises(ValueError, match="unknown model 'gpt-9000'"):
        M.load("gpt-9000")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        M.load(str(tmp_path))
    with pytest.raises(ValueError, match="bits must be"):
        M.load(str(tmp_path), bits=3)


def test_offline_hub_error_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"could not fetch 'nobody/no-such-model'.*offline default model"):
        M.load("nobody/no-such-model")


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
    with pytest.raises(ValueError) as e:
        M.load(str(tmp_path))
    msg = str(e.value)
    assert "1 missing: model.layers.0.mlp.up_proj.weight" in msg
    assert "1 unexpected: model.layers.0.extra.weight" in msg
    assert "1 mis-shaped: model.norm.weight (3,) != (64,)" in msg


# ----------------------------------------------------------------------------- tokenizer
TEXTS = ["Hello world", "naïve café — “quoted” 'single'", "1234567 and 3.14", "two  spaces   three",
         "", "A man is playing a guitar.", "emoji 🎸 and 中文", '"double" at the end"']


def _train_bpe():
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    corpus = ["The quick brown fox jumps over the lazy dog. 0123456789 café naïve"] * 50 + TEXTS * 20
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    return bpe


def test_tokenizer_parity_opt_vocab_merges(tmp_path):
    bpe = _train_bpe()
    bpe.save_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(OPT_PRE | {"vocab_size": 400}))
    ref = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                     bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                     add_bos_token=True)
    ours = M.load_tokenizer(tmp_path, M.Config.from_hf(OPT_PRE))
    for t in TEXTS:
        assert ours.encode(t) == ref(t)["input_ids"], t
        assert ours.encode(t)[0] == 2  # OPT prepends </s>


def test_tokenizer_parity_tokenizer_json(tmp_path):
    from tokenizers.processors import TemplateProcessing
    bpe = _train_bpe()
    bpe.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                "bos_token": "<s>", "eos_token": "</s>"}))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    ours = M.load_tokenizer(tmp_path, M.Config.from_hf(LLAMA_MHA))
    for t in TEXTS:
        assert ours.encode(t) == ref(t)["input_ids"], t
        assert ours.decode(ours.encode(t, bos=False)) == t
    ids, mask = ours.pad([ours.encode("a b c d"), ours.encode("a")])
    assert mask.tolist()[1][:-2] == [0] * (ids.shape[1] - 2) and ids[1, -1] == ours.encode("a")[-1]
