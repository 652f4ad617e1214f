"""Shared by the test files: tiny model configs, random Hugging Face checkpoints saved as on the
hub, a left-padded batch, the transformers reference's hidden states, a throwaway BPE tokenizer.

Importing this module needs only torch and tokenizers; a helper that builds a transformers model
skips the test that calls it where transformers is missing, not the module that imports it."""
import pytest
import torch

OPT_PRE = dict(model_type="opt", vocab_size=400, hidden_size=64, num_hidden_layers=2, ffn_dim=96,
               num_attention_heads=4, max_position_embeddings=1024, word_embed_proj_dim=64)
# opt-350m-like: post-LN, and a projection between the 32-wide embeddings and the 64-wide layers
OPT_POST = dict(OPT_PRE, do_layer_norm_before=False, word_embed_proj_dim=32, hidden_size=64)
LLAMA_MHA = dict(model_type="llama", vocab_size=400, hidden_size=64, num_hidden_layers=2,
                 intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                 max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True)
LLAMA_GQA = dict(LLAMA_MHA, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
                 rope_theta=100000.0)
# The tests' sequences fit in the 16-token window.
MISTRAL = dict(LLAMA_GQA, model_type="mistral", head_dim=16, sliding_window=16)
# q/k/v biases, no o_proj bias
QWEN2 = dict(LLAMA_GQA, model_type="qwen2", head_dim=16, tie_word_embeddings=False)
QWEN2_TIED = dict(QWEN2, tie_word_embeddings=True, num_key_value_heads=4)
CONFIGS = {
    "opt-pre-ln": OPT_PRE,
    "opt-post-ln-proj": OPT_POST,
    "llama-mha": LLAMA_MHA,
    "llama-gqa-untied": LLAMA_GQA,
    "mistral": MISTRAL,
    "qwen2-untied": QWEN2,
    "qwen2-tied": QWEN2_TIED,
}
HF_NAMES = {"opt": "OPT", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}

TEXTS = ["Hello world", "naïve café — “quoted” 'single'", "1234567 and 3.14", "two  spaces   three",
         "", "A man is playing a guitar.", "emoji 🎸 and 中文", '"double" at the end"']


def hf_model(cfg: dict):
    """A transformers *ForCausalLM with random, perturbed weights (skips without transformers)."""
    transformers = pytest.importorskip("transformers")
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


def save(ref, d, **kw):
    """A checkpoint directory as on the hub: weights, config.json, and a GPT-2 style tokenizer."""
    base_only = kw.pop("base_only", False)
    (ref.model if base_only else ref).save_pretrained(d, **kw)
    _train_bpe().save_model(str(d))


def batch(lengths, vocab=300, seed=0):
    """Random token sequences of these lengths -> (seqs, ids (B, T), mask (B, T)), padded left."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    T = max(lengths)
    ids = torch.ones(len(seqs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
    return seqs, ids, mask


def ref_hidden(cfg, ref, ids, mask, lm=False):
    """The reference's last hidden states (B, T, H), or its logits (B, T, V) with lm=True."""
    kw = {}
    # transformers' LLaMA family counts pads unless told the positions
    if cfg["model_type"] != "opt":
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
    return out.logits if lm else out.hidden_states[-1]


def weight_bytes(model) -> int:
    """Bytes held by parameters and buffers, tied weights once (4-bit weights: packed bytes)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _train_bpe():
    """A 400-token byte-level BPE trained on TEXTS and a pangram."""
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    pangram = "The quick brown fox jumps over the lazy dog. 0123456789 café naïve"
    corpus = [pangram] * 50 + TEXTS * 20
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    return bpe
