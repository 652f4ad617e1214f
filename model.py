"""A hand-written decoder for OPT and LLaMA-family (LLaMA, Mistral, Qwen2) checkpoints: final hidden
states, a key/value cache for a shared prompt prefix, the LM head. Hugging Face module names, so
checkpoints and PEFT adapters map by name. It reads a local Hugging Face directory and imports only torch,
safetensors and tokenizers (bitsandbytes to quantize), so it can be copied out alone.

    model, tok = load("path/to/opt-125m")           # support.hub.resolve turns aliases, hub ids into one
    ids, mask = tok.pad([tok.encode("A man plays a guitar.")])
    hidden = model(ids, mask)                       # (B, T, H)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn



class ModelError(ValueError):
    """A model directory or an input this decoder cannot use. model.py imports nothing of sentemb's, so it
    has its own error type; the command-line tools print it as one line, as their own."""

    user_error = True


@dataclass
class Config:
    model_type: str                  # "opt", or the LLaMA architecture: "llama", "mistral", "qwen2"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int         # grouped-query attention; = heads for OPT
    head_dim: int
    intermediate_size: int           # OPT calls it ffn_dim
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = False     # q/k/v projections: OPT enable_bias, Qwen2 always
    output_bias: bool = False        # o_proj / out_proj: OPT enable_bias, never in Qwen2
    mlp_bias: bool = False
    sliding_window: int | None = None    # Mistral, some Qwen2 layers: keys further back than this are hidden
    pre_norm: bool = True                # OPT do_layer_norm_before; opt-350m is post-LN
    word_embed_proj_dim: int = 0         # OPT: embedding width; opt-350m projects 512 <-> 1024 (project_in/out)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @staticmethod
    def from_hf(cfg: dict) -> "Config":
        """A Hugging Face config.json (as a dict) -> Config. A missing required key raises KeyError."""
        t = cfg.get("model_type")
        if t not in ("opt", "llama", "mistral", "qwen2"):
            raise ModelError(f"unsupported model_type {t!r}: sentemb supports opt, llama, mistral and qwen2")
        act = cfg.get("activation_function", "relu") if t == "opt" else cfg.get("hidden_act", "silu")
        if act != ("relu" if t == "opt" else "silu"):
            raise ModelError(f"unsupported {t} activation {act!r} (only {'relu' if t == 'opt' else 'silu'})")
        h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        specials = dict(pad_token_id=1, bos_token_id=2, eos_token_id=2) if t == "opt" else {}
        shared = dict(model_type=t, vocab_size=cfg["vocab_size"], hidden_size=h,
                      num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=nh,
                      **{k: cfg.get(k, specials.get(k)) for k in ("pad_token_id", "bos_token_id", "eos_token_id")})
        if t == "opt":
            bias = cfg.get("enable_bias", True)
            return Config(**shared, num_key_value_heads=nh, tie_word_embeddings=cfg.get("tie_word_embeddings", True),
                          max_position_embeddings=cfg["max_position_embeddings"], intermediate_size=cfg["ffn_dim"],
                          word_embed_proj_dim=cfg.get("word_embed_proj_dim", h), head_dim=h // nh, attention_bias=bias,
                          output_bias=bias, mlp_bias=bias, pre_norm=cfg.get("do_layer_norm_before", True))
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ModelError(f"unsupported rope scaling {rope} (only plain RoPE)")
        windowed = cfg.get("use_sliding_window") and cfg.get("max_window_layers", 28) < cfg["num_hidden_layers"]
        window = cfg.get("sliding_window") if t == "mistral" or windowed else None  # Qwen2: layers >= max_window_layers
        return Config(**shared, intermediate_size=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                      num_key_value_heads=cfg.get("num_key_value_heads") or nh, head_dim=cfg.get("head_dim") or h // nh,
                      max_position_embeddings=cfg.get("max_position_embeddings", 2048), sliding_window=window,
                      rope_theta=cfg.get("rope_theta") or rope.get("rope_theta", 10000.0),
                      tie_word_embeddings=cfg.get("tie_word_embeddings", False), mlp_bias=cfg.get("mlp_bias", False),
                      attention_bias=t == "qwen2" or cfg.get("attention_bias", False),
                      output_bias=cfg.get("attention_bias", False))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):                                   # LLaMA: normalise in fp32, scale in x's dtype
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope(x, cos, sin):                  # rotary position embedding: rotate pairs (x_i, x_{i+hd/2}) of (B, nh, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        nh, nkv, hd, h, b = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size, c.attention_bias
        self.q_proj = nn.Linear(h, nh * hd, bias=b)
        self.k_proj = nn.Linear(h, nkv * hd, bias=b)
        self.v_proj = nn.Linear(h, nkv * hd, bias=b)
        setattr(self, "out_proj" if c.model_type == "opt" else "o_proj", nn.Linear(nh * hd, h, bias=c.output_bias))

    def forward(self, x, mask, past, cos_sin=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.c.head_dim).transpose(1, 2)                 # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.c.head_dim).transpose(1, 2)                 # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.c.head_dim).transpose(1, 2)
        if cos_sin is not None:
            q, k = rope(q, *cos_sin), rope(k, *cos_sin)
        if past is not None:                                 # shared prefix: (1, nkv, P, hd) -> batch
            k = torch.cat([past[0].expand(B, -1, -1, -1), k], dim=2)                       # (B, nkv, P+T, hd)
            v = torch.cat([past[1].expand(B, -1, -1, -1), v], dim=2)
        # SDPA's fused kernels accumulate softmax in fp32, so fp16/bf16 stay safe.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
        y = y.transpose(1, 2).reshape(B, T, -1)                                            # (B, T, nh*hd)
        out = self.out_proj if self.c.model_type == "opt" else self.o_proj
        return out(y), (k, v)


class OPTLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.pre_norm = c.pre_norm
        self.self_attn = Attention(c)
        self.self_attn_layer_norm = nn.LayerNorm(c.hidden_size)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size)

    def forward(self, x, mask, past):
        if self.pre_norm:                    # normalise each sublayer's input
            h, present = self.self_attn(self.self_attn_layer_norm(x), mask, past)
            x = x + h
            x = x + self.fc2(F.relu(self.fc1(self.final_layer_norm(x))))
        else:                                # opt-350m: normalise after each residual add
            h, present = self.self_attn(x, mask, past)
            x = self.self_attn_layer_norm(x + h)
            x = self.final_layer_norm(x + self.fc2(F.relu(self.fc1(x))))
        return x, present


class OPTDecoder(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.max_positions = c.max_position_embeddings
        e = c.word_embed_proj_dim or c.hidden_size
        self.embed_tokens = nn.Embedding(c.vocab_size, e)
        self.embed_positions = nn.Embedding(c.max_position_embeddings + 2, c.hidden_size)   # see forward
        self.project_in = nn.Linear(e, c.hidden_size, bias=False) if e != c.hidden_size else nn.Identity()
        self.project_out = nn.Linear(c.hidden_size, e, bias=False) if e != c.hidden_size else nn.Identity()
        self.final_layer_norm = nn.LayerNorm(c.hidden_size) if c.pre_norm else nn.Identity()   # as in transformers
        self.layers = nn.ModuleList(OPTLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, input_ids, mask, pos, past):
        if mask.shape[-1] > self.max_positions:     # learned positions end; rotary ones don't
            raise ModelError(f"sequence of {mask.shape[-1]} tokens exceeds the model's {self.max_positions} positions")
        x = self.project_in(self.embed_tokens(input_ids))    # (B, T, E) -> (B, T, H); E = 512 in opt-350m, else H
        x = x + self.embed_positions(pos + 2)                # OPT's learned positions start at 2 (fairseq legacy)
        presents = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, mask, None if past is None else past[i])
            presents.append(kv)
        return self.project_out(self.final_layer_norm(x)), presents    # (B, T, E); no final norm in opt-350m


class LlamaLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        h, i, b = c.hidden_size, c.intermediate_size, c.mlp_bias
        self.self_attn = Attention(c)
        self.mlp = nn.ModuleDict(dict(gate_proj=nn.Linear(h, i, bias=b), up_proj=nn.Linear(h, i, bias=b),
                                      down_proj=nn.Linear(i, h, bias=b)))
        self.input_layernorm = RMSNorm(h, c.norm_eps)
        self.post_attention_layernorm = RMSNorm(h, c.norm_eps)

    def forward(self, x, mask, past, cos_sin):
        h, present = self.self_attn(self.input_layernorm(x), mask, past, cos_sin)
        x = x + h
        h, mlp = self.post_attention_layernorm(x), self.mlp
        return x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h)), present      # SwiGLU


class LlamaModel(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)

    def forward(self, input_ids, mask, pos, past):
        c = self.c
        if c.sliding_window and mask.shape[-1] > c.sliding_window:    # below it, the window hides nothing
            raise ModelError(f"sequence of {mask.shape[-1]} tokens exceeds this model's {c.sliding_window}-token "
                            f"sliding window (sentemb implements attention within the window only)")
        x = self.embed_tokens(input_ids)                                          # (B, T, H)
        inv = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=x.device).float() / c.head_dim)
        ang = (pos[:, None, :, None].float() * inv).repeat(1, 1, 1, 2)      # (B, 1, T, hd): pair i in both halves
        cos_sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, mask, None if past is None else past[i], cos_sin)
            presents.append(kv)
        return self.norm(x), presents


class Decoder(nn.Module):
    """`model.decoder.*` (OPT) or `model.*` (LLaMA family), plus `lm_head`, as in XForCausalLM."""

    def __init__(self, c: Config, source: Path | None = None):
        super().__init__()
        self.config, self.source = c, source        # the resolved directory (embed.py fingerprints its files)
        self.model = nn.ModuleDict({"decoder": OPTDecoder(c)}) if c.model_type == "opt" else LlamaModel(c)
        self.lm_head = nn.Linear(self.embeddings().embedding_dim, c.vocab_size, bias=False)

    @property
    def body(self) -> OPTDecoder | LlamaModel:        # HF nests OPT one level deeper: model.decoder.layers.0...
        return self.model.decoder if self.config.model_type == "opt" else self.model

    def embeddings(self) -> nn.Embedding:
        return self.body.embed_tokens

    def forward(self, input_ids, attention_mask=None, past=None, use_cache=False):
        """input_ids (B, T), attention_mask (B, T), 1 for real tokens (left padding) -> hidden states (B, T, H), and the
        key/value cache if use_cache. `past`: such a cache of a shared unpadded prefix, which every row continues."""
        B, T = input_ids.shape
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        P = 0 if past is None else past[0][0].shape[2]
        # Positions count real tokens only: a left-padded sentence gets the positions it has alone (pads: -1 -> 0).
        pos = (P + real.long().cumsum(-1) - 1).clamp(min=0)                  # (B, T)
        # Attention mask (B, 1, T, P+T): causal, no padding keys; a pad query keeps its diagonal (no all -inf row).
        mask = (real[:, None, :] | torch.eye(T, dtype=torch.bool, device=real.device)).tril()           # (B, T, T)
        mask = torch.cat([mask.new_ones(B, T, P), mask], dim=-1)[:, None]               # every row sees the prefix
        x, presents = self.body(input_ids, mask, pos, past)
        return (x, presents) if use_cache else x

    def lm_logits(self, hidden):                             # (B, T, H) -> (B, T, V)
        if self.lm_head is None:
            raise ModelError(f"{self.source} has no LM head (a base-model checkpoint): it embeds, but cannot predict")
        return self.lm_head(hidden)


class Tokenizer:
    """A `tokenizers` tokenizer plus the family's BOS rule and left padding."""

    def __init__(self, tok, bos_id: int | None, pad_id: int, eos_id: int | None):
        self.tok, self.bos_id, self.pad_id, self.eos_id = tok, bos_id, pad_id, eos_id

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def pad(self, seqs: list[list[int]], device=None):   # left-pad: the last position is each row's last real token
        T = max(len(s) for s in seqs)
        ids = torch.tensor([[self.pad_id] * (T - len(s)) + s for s in seqs], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
        return ids, mask


def load_tokenizer(path: Path, c: Config) -> Tokenizer:
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers
    tcfg = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}
    if (path / "tokenizer.json").exists():
        tok = HFTok.from_file(str(path / "tokenizer.json"))
        # The post-processor says whether BOS is prepended (LLaMA-1/2/3: yes, SmolLM2: no); add_bos_token overrides.
        probe = tok.encode("a", add_special_tokens=True).ids
        adds_bos = len(probe) > len(tok.encode("a", add_special_tokens=False).ids)
        add_bos, bos = tcfg.get("add_bos_token", adds_bos), probe[0] if adds_bos else c.bos_token_id
    elif (path / "vocab.json").exists() and (path / "merges.txt").exists():  # OPT repos: GPT-2 style BPE only
        tok = HFTok(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([t for t in ("<s>", "<pad>", "</s>", "<unk>") if tok.token_to_id(t) is not None])
        add_bos, bos = tcfg.get("add_bos_token", True), c.bos_token_id   # OPT prepends </s> (id 2)
    else:
        raise ModelError(f"no tokenizer in {path}: expected tokenizer.json or vocab.json + merges.txt")
    pad = c.pad_token_id if c.pad_token_id is not None else (c.eos_token_id or 0)
    return Tokenizer(tok, bos if add_bos else None, pad, c.eos_token_id)


def read_checkpoint(path: Path):
    """Yield (name, tensor) from safetensors (sharded or not), else .bin with weights_only."""
    from safetensors import SafetensorError, safe_open
    index = path / "model.safetensors.index.json"
    shards = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else ()
    files = [path / f for f in sorted(shards)] or sorted(path.glob("*.safetensors"))
    bins = [] if files else sorted(p for p in path.glob("*.bin") if not p.name.startswith("training_args"))
    if not files and not bins:
        raise ModelError(f"no weights in {path}: expected *.safetensors or pytorch_model*.bin")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                yield from ((k, sf.get_tensor(k)) for k in sf.keys())
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{f} is corrupt or truncated ({e}): replace it with a good copy (the converted default "
                            f"model: delete its folder, and the next run converts it again)") from None
    for f in bins:  # pickles are never unpickled beyond plain tensors
        yield from torch.load(f, map_location="cpu", weights_only=True, mmap=True).items()


def default_dtype(device) -> torch.dtype:
    """$SENTEMB_DTYPE if set; else bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX), float32
    where bf16 is emulated (slower)."""
    forced = os.environ.get("SENTEMB_DTYPE")
    if forced:
        if forced not in ("float32", "bfloat16", "float16"):
            raise ModelError(f"SENTEMB_DTYPE={forced}: use float32, bfloat16 or float16")
        return getattr(torch, forced)
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    native = [getattr(torch.cpu, check, lambda: False)() for check in checks]
    return torch.bfloat16 if any(native) else torch.float32


def read_config(path: Path) -> Config:
    """path/config.json -> Config; a missing, broken or incomplete file is a ModelError."""
    file = path / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} has no config.json: not a Hugging Face model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{file} is not valid JSON ({e}): replace it with a good copy") from None
    try:
        return Config.from_hf(cfg)
    except KeyError as e:
        raise ModelError(f"{file} has no {e.args[0]!r}: not a complete {cfg['model_type']} config") from None


def load(path, dtype=None, device=None, bits=None):
    """A local Hugging Face directory -> (Decoder in eval mode, Tokenizer). bits=4/8 quantizes the linears
    but the head (QLoRA's base); a base-model checkpoint (no LM head, untied) gets lm_head None."""
    if bits not in (None, 4, 8):
        raise ModelError(f"bits must be 4 or 8 (quantization; precision is dtype's), not {bits!r}")
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no such directory")
    c = read_config(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):   # no memory until a checkpoint tensor is assigned
        model = Decoder(c, path)
    tied = {"lm_head.weight"} if c.tie_word_embeddings else set()
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
    seen, unexpected, misshaped = set(), [], []
    for name, t in read_checkpoint(path):
        name = name if name.startswith(("model.", "lm_head.")) else "model." + name   # saved from a base model
        if name not in expected:
            if name not in tied:                      # else a saved copy of the tied embedding
                unexpected.append(name)
            continue
        seen.add(name)                                # a mis-shaped tensor is reported as such, not as missing
        if tuple(t.shape) != tuple(expected[name]):
            misshaped.append(f"{name} {tuple(t.shape)} != {tuple(expected[name])}")
            continue
        mod_name, _, pname = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        setattr(mod, pname, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
        body_linear = isinstance(mod, nn.Linear) and mod_name != "lm_head"   # QLoRA: not embeddings, norms, head
        if bits in (4, 8) and body_linear and not any(p.is_meta for p in mod.parameters()):  # weight, bias read
            model.set_submodule(mod_name, quantize(mod, bits, dtype, device))
    missing = sorted(set(expected) - seen - {"lm_head.weight"})
    if missing or unexpected or misshaped:
        parts = [f"{len(v)} {k}: {', '.join(v[:8])}{' ...' if len(v) > 8 else ''}"
                 for k, v in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if v]
        raise ModelError(f"checkpoint {path} does not match its config.json: " + "; ".join(parts))
    if c.tie_word_embeddings:
        model.lm_head.weight = model.embeddings().weight
    elif "lm_head.weight" not in seen:
        model.lm_head = None                          # a base model: embeddings only
    model.eval().requires_grad_(False)
    return model, load_tokenizer(path, c)


def quantize(lin: nn.Linear, bits, dtype, device):
    """nn.Linear -> bitsandbytes Linear4bit (NF4, double quantization, computing in dtype) or Linear8bitLt."""
    import logging
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # else warns: no `kernels` package
    import bitsandbytes as bnb
    n_in, n_out, bias, w = lin.in_features, lin.out_features, lin.bias is not None, lin.weight.data.cpu()
    if bits == 4:
        q = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
        # Else eval mode repacks a CPU weight in place for a bf16 kernel with no backward: evaluation != training.
        q.support_avx512bf16_for_cpu = False
    else:
        q = bnb.nn.Linear8bitLt(n_in, n_out, bias=bias, has_fp16_weights=False, device="meta")
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if bias:
        q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
    return q.to(device)         # quantizes: else the first forward fails ("quantization state not initialized")
