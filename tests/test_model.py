"""model.py against transformers (the reference oracle) on tiny random checkpoints."""
import fnmatch
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
MISTRAL = dict(LLAMA_GQA, model_type="mistral", head_dim=16, sliding_window=16)   # the tests' sequences fit in it
QWEN2 = dict(LLAMA_GQA, model_type="qwen2", head_dim=16, tie_word_embeddings=False)  # q/k/v biases, no o_proj bias
QWEN2_TIED = dict(QWEN2, tie_word_embeddings=True, num_key_value_heads=4)
CONFIGS = {"opt-pre-ln": OPT_PRE, "opt-post-ln-proj": OPT_POST, "llama-mha": LLAMA_MHA, "llama-gqa-untied": LLAMA_GQA,
           "mistral": MISTRAL, "qwen2-untied": QWEN2, "qwen2-tied": QWEN2_TIED}
HF_NAMES = {"opt": "OPT", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def hf_model(cfg: dict):
    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    name = HF_NAMES[cfg["model_type"]]
    conf = getattr(transformers, f"{name}Config")(**kw)
    if name == "OPT":
        conf._remove_final_layer_norm = not kw.get("do_layer_norm_before", True)
    torch.manual_seed(0)
    m = getattr(transformers, f"{name}ForCausalLM")(conf).eval()
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
    if cfg["model_type"] != "opt":  # transformers' LLaMA family counts pads unless told the positions
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


def test_base_model_checkpoint_embeds_without_lm_head(tmp_path):
    # Embedding checkpoints are often saved from LlamaModel: no "model." prefix, and no lm_head when untied.
    ref = hf_model(LLAMA_GQA)
    save(ref, tmp_path, base_only=True)
    ours, _ = M.load(str(tmp_path))
    _, ids, mask = batch([4, 9])
    with torch.no_grad():
        got = ours(ids, mask)
    torch.testing.assert_close(got[mask.bool()], ref_hidden(LLAMA_GQA, ref, ids, mask)[mask.bool()], atol=1e-5, rtol=0)
    with pytest.raises(M.UserError) as e:
        ours.lm_logits(got)
    assert str(e.value) == f"{tmp_path} has no LM head (a base-model checkpoint): it embeds, but cannot predict"


def test_sliding_window_past_it_is_an_error(tmp_path):    # below it, parity above shows plain causal attention
    save(hf_model(MISTRAL), tmp_path)
    ours, _ = M.load(str(tmp_path))
    with pytest.raises(M.UserError) as e:
        ours(torch.ones(1, 17, dtype=torch.long))
    assert str(e.value) == ("sequence of 17 tokens exceeds this model's 16-token sliding window "
                            "(sentemb implements attention within the window only)")
    _, past = ours(torch.ones(1, 10, dtype=torch.long), use_cache=True)
    with pytest.raises(M.UserError, match="sequence of 18 tokens"):    # the prefix counts
        ours(torch.ones(2, 8, dtype=torch.long), past=past)


def test_qwen2_windows_only_layers_from_max_window_layers(tmp_path):
    cfg = dict(QWEN2, use_sliding_window=True, sliding_window=8, max_window_layers=2)   # no layer is windowed
    ref = hf_model(cfg)
    save(ref, tmp_path)
    ours, _ = M.load(str(tmp_path))
    _, ids, mask = batch([12, 5])                                       # longer than the window: full attention
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask)[mask.bool()], ref_hidden(cfg, ref, ids, mask)[mask.bool()],
                                   atol=1e-5, rtol=0)
    assert M.Config.from_hf(dict(cfg, max_window_layers=1)).sliding_window == 8    # layer 1 is: refused past it


def test_default_dtype(monkeypatch):
    assert M.default_dtype("cuda") == torch.bfloat16
    for avx512_bf16, amx, want in ((False, False, torch.float32), (True, False, torch.bfloat16),
                                   (False, True, torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert M.default_dtype("cpu") == want


# ----------------------------------------------------------------------------- errors
def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model '/nonexistent/model': not a local directory"):
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
    with pytest.raises(M.UserError, match=r"^could not fetch model 'nobody/no-such-model' from the Hugging Face Hub"):
        M.load("nobody/no-such-model")


@pytest.mark.parametrize("repo_files, fetched", [
    (["consolidated.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json", "params.json", "config.json", "tokenizer.json", "tokenizer.model"],
     ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json", "params.json", "tokenizer.json", "tokenizer.model"]),   # Mistral-7B-v0.3
    (["pytorch_model.bin", "training_args.bin", "config.json", "vocab.json", "merges.txt"],
     ["config.json", "merges.txt", "pytorch_model.bin", "vocab.json"]),                          # pickles only
])
def test_hub_fetch_takes_the_weights_transformers_loads_once(repo_files, fetched, tmp_path, monkeypatch):
    def snapshot(repo, patterns, what="model"):   # the hub, offline: a folder with the files that match
        for f in repo_files:
            if any(fnmatch.fnmatch(f, p) for p in patterns):
                (tmp_path / f).touch()
        return tmp_path
    monkeypatch.setattr(M.common, "hub_snapshot", snapshot)
    assert M.resolve("owner/model") == tmp_path and sorted(f.name for f in tmp_path.iterdir()) == fetched

@pytest.fixture
def tiny_dir(tmp_path):
    save(hf_model(LLAMA_MHA), tmp_path)
    return tmp_path


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_names_the_file(tiny_dir, damage):
    f = tiny_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"not a checkpoint at all")
    with pytest.raises(M.UserError) as e:
        M.load(str(tiny_dir))
    detail = ("incomplete metadata, file not fully covered" if damage == "truncated" else "header too large")
    assert str(e.value) == (f"{f} is corrupt or truncated (Error while deserializing header: {detail}): replace it "
                            f"with a good copy (the converted default model: delete its folder, and the next run "
                            f"converts it again)")


def test_invalid_config_json_names_the_file(tiny_dir):
    cfg = tiny_dir / "config.json"
    good = json.loads(cfg.read_text())
    cfg.write_text('{"model_type": "llama",')
    with pytest.raises(M.UserError) as e:
        M.load(str(tiny_dir))
    assert str(e.value) == (f"{cfg} is not valid JSON (Expecting property name enclosed in double quotes: "
                            f"line 1 column 24 (char 23)): replace it with a good copy")
    cfg.write_text(json.dumps({k: v for k, v in good.items() if k != "hidden_size"}))
    with pytest.raises(M.UserError) as e:
        M.load(str(tiny_dir))
    assert str(e.value) == f"{cfg} has no 'hidden_size': not a complete llama config"


def test_device_is_validated(tiny_dir):
    with pytest.raises(M.UserError) as e:
        M.load(str(tiny_dir), device="tpu")
    assert str(e.value) == "--device 'tpu': not a device; use cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        with pytest.raises(M.UserError) as e:
            M.load(str(tiny_dir), device="cuda")
        assert str(e.value) == f"--device cuda: this torch has no CUDA device ({torch.__version__}); use --device cpu"


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
