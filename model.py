"""A hand-written decoder for OPT and LLaMA checkpoints, loaded from safetensors.

Everything a sentence embedder needs from a causal LM: the final hidden states (after the final norm / projection,
what transformers returns as `hidden_states[-1]`), a key/value cache for a shared prompt prefix, and the LM head
only when asked. Module names follow the Hugging Face checkpoints (`model.decoder.layers.0.self_attn.q_proj`,
`model.layers.0.mlp.gate_proj`, ...) so checkpoint tensors and PEFT adapters map by name.

    model, tok = load("smollm2-135m")
    ids, mask = tok.pad([tok.encode("A man plays a guitar.")])
    hidden = model(ids, mask)                       # (B, T, H)
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Short names. The paper evaluates OPT 125M..66B and LLaMA-1 7B..30B.
ALIASES = {**{f"opt-{s}": f"facebook/opt-{s}" for s in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")},
           "llama-7b": "huggyllama/llama-7b", "llama-13b": "huggyllama/llama-13b", "llama-30b": "huggyllama/llama-30b",
           "llama2-7b": "meta-llama/Llama-2-7b-hf", "llama3-8b": "meta-llama/Meta-Llama-3-8B",
           "smollm2-135m": None}  # offline default: converted from a PyPI wheel (convert_gguf.py)
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class Config:
    model_type: str                  # "opt" or "llama"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int         # LLaMA grouped-query attention; = heads for OPT
    head_dim: int
    intermediate_size: int           # OPT calls it ffn_dim
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = False     # LLaMA: False; OPT: enable_bias (True)
    mlp_bias: bool = False
    # OPT traps. opt-350m is the odd one out: post-LN blocks, no final layer norm,
    # and 512-d embeddings projected to the 1024-d residual stream (project_in/out).
    pre_norm: bool = True                # OPT do_layer_norm_before
    word_embed_proj_dim: int = 0         # OPT: embedding width; project_in/out iff != hidden_size
    final_norm: bool = True              # OPT: final_layer_norm only in pre-LN models
    position_offset: int = 2             # OPT learned positions are shifted by 2 (fairseq legacy)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @staticmethod
    def from_hf(cfg: dict) -> "Config":
        t = cfg.get("model_type")
        if t == "opt":
            if cfg.get("activation_function", "relu") != "relu":
                raise ValueError(f"unsupported OPT activation {cfg['activation_function']!r} (only relu)")
            pre = cfg.get("do_layer_norm_before", True)
            h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
            return Config("opt", cfg["vocab_size"], h, cfg["num_hidden_layers"], nh, nh, h // nh, cfg["ffn_dim"],
                          cfg["max_position_embeddings"], tie_word_embeddings=cfg.get("tie_word_embeddings", True),
                          attention_bias=cfg.get("enable_bias", True), mlp_bias=cfg.get("enable_bias", True),
                          pre_norm=pre, word_embed_proj_dim=cfg.get("word_embed_proj_dim", h),
                          # transformers drops the final LN of post-LN OPT (opt-350m)
                          final_norm=pre and not cfg.get("_remove_final_layer_norm", False),
                          pad_token_id=cfg.get("pad_token_id", 1), bos_token_id=cfg.get("bos_token_id", 2),
                          eos_token_id=cfg.get("eos_token_id", 2))
        if t == "llama":
            if cfg.get("hidden_act", "silu") != "silu":
                raise ValueError(f"unsupported LLaMA activation {cfg['hidden_act']!r} (only silu)")
            scaling = cfg.get("rope_scaling") or {}
            if scaling.get("rope_type", scaling.get("type", "default")) != "default":
                raise ValueError(f"unsupported rope_scaling {scaling} (only plain RoPE)")
            h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
            theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
            return Config("llama", cfg["vocab_size"], h, cfg["num_hidden_layers"], nh,
                          cfg.get("num_key_value_heads") or nh, cfg.get("head_dim") or h // nh,
                          cfg["intermediate_size"], cfg.get("max_position_embeddings", 2048),
                          norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta,
                          tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                          attention_bias=cfg.get("attention_bias", False), mlp_bias=cfg.get("mlp_bias", False),
                          position_offset=0, pad_token_id=cfg.get("pad_token_id"),
                          bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))
        raise ValueError(f"unsupported model_type {t!r}: sentemb supports 'opt' and 'llama'")


# ----------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):                                   # LLaMA: normalise in fp32, scale in x's dtype
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        nh, nkv, hd, b = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, nh * hd, bias=b)
        self.k_proj = nn.Linear(c.hidden_size, nkv * hd, bias=b)
        self.v_proj = nn.Linear(c.hidden_size, nkv * hd, bias=b)
        setattr(self, "out_proj" if c.model_type == "opt" else "o_proj", nn.Linear(nh * hd, c.hidden_size, bias=b))

    def forward(self, x, mask, rope, past):
        B, T, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(B, T, c.num_attention_heads, c.head_dim).transpose(1, 2)   # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)   # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope                                                                # (B, 1, T, hd)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if past is not None:                                 # shared prefix: (1, nkv, P, hd) -> batch
            k = torch.cat([past[0].expand(B, -1, -1, -1), k], dim=2)                       # (B, nkv, P+T, hd)
            v = torch.cat([past[1].expand(B, -1, -1, -1), v], dim=2)
        # SDPA's fused kernels accumulate softmax in fp32, so fp16/bf16 stay safe.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           enable_gqa=c.num_key_value_heads != c.num_attention_heads)
        y = y.transpose(1, 2).reshape(B, T, -1)                                            # (B, T, nh*hd)
        out = self.out_proj if c.model_type == "opt" else self.o_proj
        return out(y), (k, v)


class OPTLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.self_attn = Attention(c)
        self.self_attn_layer_norm = nn.LayerNorm(c.hidden_size)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size)

    def forward(self, x, mask, rope, past):
        pre = self.c.pre_norm             # opt-350m: post-LN, i.e. the norm comes after the residual add
        h, present = self.self_attn(self.self_attn_layer_norm(x) if pre else x, mask, rope, past)
        x = x + h if pre else self.self_attn_layer_norm(x + h)
        h = self.fc2(F.relu(self.fc1(self.final_layer_norm(x) if pre else x)))
        return (x + h if pre else self.final_layer_norm(x + h)), present


class LlamaMLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):                                   # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)

    def forward(self, x, mask, rope, past):
        h, present = self.self_attn(self.input_layernorm(x), mask, rope, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


class OPTDecoder(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        e = c.word_embed_proj_dim or c.hidden_size
        self.embed_tokens = nn.Embedding(c.vocab_size, e)
        self.embed_positions = nn.Embedding(c.max_position_embeddings + c.position_offset, c.hidden_size)
        if e != c.hidden_size:
            self.project_in = nn.Linear(e, c.hidden_size, bias=False)
            self.project_out = nn.Linear(c.hidden_size, e, bias=False)
        if c.final_norm:
            self.final_layer_norm = nn.LayerNorm(c.hidden_size)
        self.layers = nn.ModuleList(OPTLayer(c) for _ in range(c.num_hidden_layers))


class LlamaBackbone(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)


class Decoder(nn.Module):
    """`model.decoder.*` (OPT) or `model.*` (LLaMA), plus `lm_head`, as in XForCausalLM."""

    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        # HF nests OPT one level deeper (model.decoder.layers.0...) than LLaMA (model.layers.0...)
        self.model = nn.ModuleDict({"decoder": OPTDecoder(c)}) if c.model_type == "opt" else LlamaBackbone(c)
        self.lm_head = nn.Linear(self.embeddings().embedding_dim, c.vocab_size, bias=False)

    def embeddings(self) -> nn.Embedding:
        return (self.model.decoder if self.config.model_type == "opt" else self.model).embed_tokens

    def forward(self, input_ids, attention_mask=None, past=None, use_cache=False):
        """input_ids (B, T), attention_mask (B, T) with 1 for real tokens (left padding) -> hidden states (B, T, H),
        and this call's key/value cache too if use_cache.

        `past`: the cache of a shared, unpadded prefix of length P, as returned by an earlier use_cache=True call on
        a batch of one. The new tokens continue it: their positions start at P, and every row sees the whole prefix.
        """
        c = self.config
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        P = 0 if past is None else past[0][0].shape[2]
        if c.model_type == "opt" and P + T > c.max_position_embeddings:  # learned positions end; rotary ones don't
            raise ValueError(f"sequence of {P + T} tokens exceeds this OPT model's "
                             f"{c.max_position_embeddings} positions")
        # Positions count real tokens only, so a left-padded sentence gets exactly the
        # positions it would have alone (transformers' OPT does the same; pads get -1 -> clamped).
        pos = (P + mask.long().cumsum(-1) - 1).clamp(min=0)                  # (B, T)
        # Attention mask (B, 1, T, P+T): causal, and no attention to padding keys. A pad
        # query keeps its own diagonal so no row is all -inf (its output is never used).
        causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
        attn = (causal & mask[:, None, :]) | torch.eye(T, dtype=torch.bool, device=mask.device)
        attn = (torch.cat([attn.new_ones(B, T, P), attn], dim=-1) if P else attn)[:, None]   # every row sees the prefix
        d = self.model.decoder if c.model_type == "opt" else self.model
        x = d.embed_tokens(input_ids)                 # (B, T, H); opt-350m: (B, T, 512) until project_in
        rope = None
        if c.model_type == "opt":
            if hasattr(d, "project_in"):
                x = d.project_in(x)
            x = x + d.embed_positions(pos + c.position_offset)              # (B, T, H)
        else:
            inv = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=x.device).float() / c.head_dim)
            ang = pos[:, None, :, None].float() * inv                       # (B, 1, T, hd/2)
            ang = torch.cat([ang, ang], dim=-1)                             # (B, 1, T, hd)
            rope = (ang.cos().to(x.dtype), ang.sin().to(x.dtype))
        presents = []
        for i, layer in enumerate(d.layers):
            x, kv = layer(x, attn, rope, None if past is None else past[i])
            presents.append(kv)
        if c.model_type == "llama":
            x = d.norm(x)
        elif c.final_norm:
            x = d.final_layer_norm(x)
        if hasattr(d, "project_out"):
            x = d.project_out(x)
        return (x, presents) if use_cache else x

    def lm_logits(self, hidden):                             # (B, T, H) -> (B, T, V)
        return self.lm_head(hidden)


# ----------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """A `tokenizers` tokenizer plus the family's BOS rule and left padding."""

    def __init__(self, tok, bos_id: int | None, pad_id: int, eos_id: int | None):
        self.tok, self.bos_id, self.pad_id, self.eos_id = tok, bos_id, pad_id, eos_id

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def pad(self, seqs: list[list[int]], device=None):
        """Left-pad to the longest: the last position is every row's last real token."""
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
        return ids.to(device), mask.to(device)


def load_tokenizer(path: Path, c: Config) -> Tokenizer:
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers
    tcfg = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}
    if (path / "tokenizer.json").exists():
        tok = HFTok.from_file(str(path / "tokenizer.json"))
        # tokenizer.json's post-processor says whether this family prepends BOS (LLaMA-1/2/3
        # do, SmolLM2 doesn't); tokenizer_config's add_bos_token overrides it, as in transformers.
        probe = tok.encode("a", add_special_tokens=True).ids
        adds_bos = len(probe) > len(tok.encode("a", add_special_tokens=False).ids)
        add_bos, bos = tcfg.get("add_bos_token", adds_bos), probe[0] if adds_bos else c.bos_token_id
    elif (path / "vocab.json").exists() and (path / "merges.txt").exists():  # OPT repos: GPT-2 style BPE only
        tok = HFTok(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        vocab = json.loads((path / "vocab.json").read_text())
        tok.add_special_tokens([t for t in ("<s>", "<pad>", "</s>", "<unk>") if t in vocab])
        add_bos, bos = tcfg.get("add_bos_token", True), c.bos_token_id   # OPT prepends </s> (id 2)
    else:
        raise ValueError(f"no tokenizer in {path}: expected tokenizer.json or vocab.json + merges.txt")
    pad = c.pad_token_id if c.pad_token_id is not None else (c.eos_token_id or 0)
    return Tokenizer(tok, bos if add_bos else None, pad, c.eos_token_id)


# ----------------------------------------------------------------------------- loading
def resolve(name: str) -> Path:
    """Alias, local directory or hub id -> a local directory with config.json."""
    if os.path.isdir(name):
        return Path(name)
    if name in ALIASES:
        if ALIASES[name] is None:
            import convert_gguf
            return convert_gguf.smollm2_dir()
        name = ALIASES[name]
    elif not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or name.startswith((".", "/")):
        if os.sep in name or name.startswith("."):
            raise ValueError(f"model directory not found: {name}")
        raise ValueError(f"unknown model {name!r}: not a local directory, an alias ({', '.join(ALIASES)}) "
                         f"or a Hugging Face repo id (owner/name)")
    return download(name)


def download(repo: str) -> Path:
    from huggingface_hub import snapshot_download
    meta = ["*.json", "*.txt", "tokenizer.model"]
    try:  # safetensors only; repos that ship only pickles fall back to .bin (read weights_only)
        path = Path(snapshot_download(repo, allow_patterns=meta + ["*.safetensors"]))
        if not list(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo, allow_patterns=meta + ["*.bin"]))
        return path
    except Exception as e:  # offline, unknown repo, gated repo: one clear line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"could not fetch {repo!r} from the Hugging Face Hub ({type(e).__name__}: {msg[:160]}). "
                         f"Without network, pass a local model directory, or use the offline default "
                         f"model '{DEFAULT_MODEL}'.") from None


def read_checkpoint(path: Path):
    """Yield (name, tensor) from safetensors (sharded or not), else .bin with weights_only."""
    from safetensors import safe_open
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if files:
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    yield k, sf.get_tensor(k)
        return
    bins = sorted(p for p in path.glob("*.bin") if not p.name.startswith("training_args"))
    if not bins:
        raise ValueError(f"no weights in {path}: expected *.safetensors or pytorch_model*.bin")
    for f in bins:  # pickles are never unpickled beyond plain tensors
        yield from torch.load(f, map_location="cpu", weights_only=True, mmap=True).items()


def load(name_or_path: str = DEFAULT_MODEL, dtype=None, device=None, bits=None):
    """-> (Decoder in eval mode, Tokenizer). bits=4/8 quantizes the block linears (QLoRA bases)."""
    if bits not in (None, 4, 8, 16, 32):
        raise ValueError(f"bits must be 4, 8, 16 or 32, not {bits!r}")
    path = resolve(name_or_path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
    c = Config.from_hf(json.loads((path / "config.json").read_text()))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:  # bf16 is ~5x slower than fp32 on a typical CPU; on GPUs it is the norm
        dtype = {16: torch.bfloat16}.get(bits, torch.bfloat16 if device.type == "cuda" else torch.float32)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):   # no memory until a checkpoint tensor is assigned
        model = Decoder(c)
    tied = {"lm_head.weight"} if c.tie_word_embeddings else set()
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
    quant = _quantizer(bits, dtype, device) if bits in (4, 8) else None
    seen, unexpected, misshaped = set(), [], []
    for name, t in read_checkpoint(path):
        if not name.startswith(("model.", "lm_head.")):  # saved from OPTModel (e.g. facebook/opt-*): no "model."
            name = "model." + name
        if name in tied:
            continue                                  # a saved copy of the tied embedding
        if name not in expected:
            unexpected.append(name)
            continue
        seen.add(name)                                # a mis-shaped tensor is reported as such, not as missing
        if tuple(t.shape) != tuple(expected[name]):
            misshaped.append(f"{name} {tuple(t.shape)} != {tuple(expected[name])}")
            continue
        mod_name, _, pname = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        setattr(mod, pname, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
        block_linear = isinstance(mod, nn.Linear) and ".layers." in mod_name  # QLoRA: not embeddings, norms, head
        if quant and block_linear and not any(p.is_meta for p in mod.parameters()):  # weight and bias both read
            model.set_submodule(mod_name, quant(mod))
    missing = sorted(set(expected) - seen)
    if missing or unexpected or misshaped:
        parts = [f"{len(v)} {k}: {', '.join(v[:8])}{' ...' if len(v) > 8 else ''}"
                 for k, v in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if v]
        raise ValueError(f"checkpoint {path} does not match its config.json: " + "; ".join(parts))
    if c.tie_word_embeddings:
        model.lm_head.weight = model.embeddings().weight
    model.eval().requires_grad_(False)
    model.source = path          # the resolved directory (embed.py fingerprints its files)
    return model, load_tokenizer(path, c)


def _quantizer(bits, dtype, device):
    """bits -> function nn.Linear -> bitsandbytes Linear4bit (NF4, double quant) / Linear8bitLt."""
    import bitsandbytes as bnb

    def quantize(lin: nn.Linear):
        n_in, n_out, bias, w = lin.in_features, lin.out_features, lin.bias is not None, lin.weight.data.cpu()
        if bits == 4:
            q = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=dtype, compress_statistics=True,
                                  quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
            # bitsandbytes 0.50 repacks a CPU weight in place for a bf16 inference kernel at the
            # first eval-mode forward; that kernel has no backward and the repacking has no exact
            # inverse, so a frozen QLoRA base would drift between evaluation and training. Off.
            q.support_avx512bf16_for_cpu = False
        else:
            q = bnb.nn.Linear8bitLt(n_in, n_out, bias=bias, has_fp16_weights=False, device="meta")
            q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        if bias:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        # .to(device) is what quantizes; without it the first forward fails with a
        # misleading "quantization state not initialized" assertion.
        return q.to(device)
    return quantize


def weight_bytes(model) -> int:
    """Bytes held by parameters and buffers (4-bit weights count as their packed bytes)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}   # tied weights count once
    n = sum(t.numel() * t.element_size() for t in tensors.values())
    for m in model.modules():  # NF4 statistics live in quant_state (nested: state2), not in parameters
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        while qs is not None:
            stats = [t for t in (qs.absmax, getattr(qs, "code", None)) if isinstance(t, torch.Tensor)]
            n += sum(t.numel() * t.element_size() for t in stats)
            qs = getattr(qs, "state2", None)
    return n
