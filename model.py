"""A hand-written decoder for OPT and LLaMA-family (LLaMA, Mistral, Qwen2) checkpoints: final hidden
states, a key/value cache for a shared prompt prefix, the LM head. Hugging Face module names, so
checkpoints and PEFT adapters map by name. It reads a local Hugging Face directory and imports only
torch and safetensors (bitsandbytes to quantize), so it can be copied out alone.

    model = load("path/to/opt-125m", dtype=torch.bfloat16)    # support.hub.resolve finds the folder
    hidden = model(ids, mask)                    # (B, T) left-padded token ids -> (B, T, H)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class ModelError(ValueError):
    """A model directory or an input this decoder cannot use; the command-line tools print it as one
    line (model.py imports nothing of sentemb's, so it has its own error type)."""
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
    sliding_window: int | None = None  # Mistral, some Qwen2 layers: keys further back are hidden
    pre_norm: bool = True              # OPT do_layer_norm_before; opt-350m is post-LN
    word_embed_proj_dim: int = 0       # OPT's embedding width; opt-350m projects 512 <-> 1024
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @staticmethod
    def from_hf(cfg: dict) -> Config:
        """A Hugging Face config.json (a dict) -> Config; a missing required key raises KeyError."""
        family = cfg.get("model_type")
        if family not in ("opt", "llama", "mistral", "qwen2"):
            raise ModelError(f"unsupported model_type {family!r}: "
                             f"sentemb supports opt, llama, mistral and qwen2")
        return Config.from_opt(cfg) if family == "opt" else Config.from_llama(cfg)

    @staticmethod
    def from_opt(cfg: dict) -> Config:
        act = cfg.get("activation_function", "relu")
        if act != "relu":
            raise ModelError(f"unsupported opt activation {act!r} (only relu)")
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        bias = cfg.get("enable_bias", True)
        return Config(
            model_type="opt", vocab_size=cfg["vocab_size"], hidden_size=hidden,
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=heads, head_dim=hidden // heads, intermediate_size=cfg["ffn_dim"],
            max_position_embeddings=cfg["max_position_embeddings"],
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            attention_bias=bias, output_bias=bias, mlp_bias=bias,
            pre_norm=cfg.get("do_layer_norm_before", True),
            word_embed_proj_dim=cfg.get("word_embed_proj_dim", hidden),
            pad_token_id=cfg.get("pad_token_id", 1),          # OPT's tokenizer: <pad> 1, </s> 2
            bos_token_id=cfg.get("bos_token_id", 2), eos_token_id=cfg.get("eos_token_id", 2))

    @staticmethod
    def from_llama(cfg: dict) -> Config:
        family = cfg["model_type"]
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ModelError(f"unsupported {family} activation {act!r} (only silu)")
        rope_cfg = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        if rope_cfg.get("rope_type", rope_cfg.get("type", "default")) != "default":
            raise ModelError(f"unsupported rope scaling {rope_cfg} (only plain RoPE)")
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        layers = cfg["num_hidden_layers"]
        # Mistral windows every layer; Qwen2 only the layers from max_window_layers on.
        some_windowed = cfg.get("use_sliding_window") and cfg.get("max_window_layers", 28) < layers
        window = cfg.get("sliding_window") if family == "mistral" or some_windowed else None
        return Config(
            model_type=family, vocab_size=cfg["vocab_size"], hidden_size=hidden,
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta") or rope_cfg.get("rope_theta", 10000.0),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            # Qwen2 has q/k/v biases whatever attention_bias says, and no o_proj bias.
            attention_bias=family == "qwen2" or cfg.get("attention_bias", False),
            output_bias=cfg.get("attention_bias", False), mlp_bias=cfg.get("mlp_bias", False),
            sliding_window=window, pad_token_id=cfg.get("pad_token_id"),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):                      # as LLaMA: normalise in fp32, scale in x's dtype
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope(x, cos, sin):
    """Rotary position embedding: rotate the pairs (x_i, x_{i+hd/2}) of x (B, heads, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Causal self-attention with grouped-query key/value heads, over a left-padded batch and an
    optional shared prefix cache. The families share q/k/v; each names its output projection."""

    def __init__(self, c: Config):
        super().__init__()
        self.head_dim = c.head_dim
        q_width = c.num_attention_heads * c.head_dim
        kv_width = c.num_key_value_heads * c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, q_width, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, kv_width, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, kv_width, bias=c.attention_bias)

    def attend(self, x, mask, past, cos_sin=None):
        """x (B, T, H) -> the heads' outputs (B, T, nh*hd) before the output projection, and the
        keys and values (B, nkv, P+T, hd) a later call may continue from."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)     # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)     # (B, nkv, T, hd)
        if cos_sin is not None:
            q = rope(q, *cos_sin)
            k = rope(k, *cos_sin)
        if past is not None:               # a shared prefix (1, nkv, P, hd), the same for every row
            k = torch.cat([past[0].expand(B, -1, -1, -1), k], dim=2)       # (B, nkv, P+T, hd)
            v = torch.cat([past[1].expand(B, -1, -1, -1), v], dim=2)
        # SDPA's fused kernels accumulate softmax in fp32, so fp16/bf16 stay safe.
        grouped = k.shape[1] != q.shape[1]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)
        return y.transpose(1, 2).reshape(B, T, -1), (k, v)                  # (B, T, nh*hd)


class OPTAttention(Attention):
    def __init__(self, c: Config):
        super().__init__(c)
        self.out_proj = nn.Linear(self.q_proj.out_features, c.hidden_size, bias=c.output_bias)

    def forward(self, x, mask, past):      # positions: learned, in the embeddings (OPTDecoder)
        y, present = self.attend(x, mask, past)
        return self.out_proj(y), present


class LlamaAttention(Attention):
    def __init__(self, c: Config):
        super().__init__(c)
        self.o_proj = nn.Linear(self.q_proj.out_features, c.hidden_size, bias=c.output_bias)

    def forward(self, x, mask, past, cos_sin):   # rotary positions turn q and k
        y, present = self.attend(x, mask, past, cos_sin)
        return self.o_proj(y), present


class OPTLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.pre_norm = c.pre_norm
        self.self_attn = OPTAttention(c)
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
        width = c.word_embed_proj_dim or c.hidden_size      # E: 512 in opt-350m, else H
        project = width != c.hidden_size
        self.embed_tokens = nn.Embedding(c.vocab_size, width)
        # OPT's learned positions start at 2 (a fairseq legacy), hence 2 extra rows.
        self.embed_positions = nn.Embedding(c.max_position_embeddings + 2, c.hidden_size)
        self.project_in = nn.Linear(width, c.hidden_size, bias=False) if project else nn.Identity()
        self.project_out = nn.Linear(c.hidden_size, width, bias=False) if project else nn.Identity()
        # As in transformers: the post-LN opt-350m has no final norm.
        self.final_layer_norm = nn.LayerNorm(c.hidden_size) if c.pre_norm else nn.Identity()
        self.layers = nn.ModuleList(OPTLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, input_ids, mask, pos, past):
        T = mask.shape[-1]
        if T > self.max_positions:     # learned positions end; rotary ones don't
            raise ModelError(f"sequence of {T} tokens exceeds the model's "
                             f"{self.max_positions} positions")
        x = self.project_in(self.embed_tokens(input_ids))     # (B, T, E) -> (B, T, H)
        x = x + self.embed_positions(pos + 2)
        presents = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, mask, None if past is None else past[i])
            presents.append(kv)
        return self.project_out(self.final_layer_norm(x)), presents     # (B, T, E)


class LlamaMLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):                  # SwiGLU: (B, T, H) -> (B, T, I) -> (B, T, H)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.self_attn = LlamaAttention(c)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)

    def forward(self, x, mask, past, cos_sin):   # pre-norm: normalise each sublayer's input
        h, present = self.self_attn(self.input_layernorm(x), mask, past, cos_sin)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class LlamaModel(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)

    def forward(self, input_ids, mask, pos, past):
        c = self.c
        T = mask.shape[-1]
        if c.sliding_window and T > c.sliding_window:   # below it, the window hides nothing
            raise ModelError(f"sequence of {T} tokens exceeds this model's {c.sliding_window}"
                             f"-token sliding window (sentemb implements attention within the "
                             f"window only)")
        x = self.embed_tokens(input_ids)                                   # (B, T, H)
        # RoPE angles pos * theta^(-2i/hd) of the pairs i: (B, 1, T, hd), each in both halves.
        exponents = torch.arange(0, c.head_dim, 2, device=x.device).float() / c.head_dim
        inv_freq = 1.0 / c.rope_theta ** exponents
        angles = (pos[:, None, :, None].float() * inv_freq).repeat(1, 1, 1, 2)
        cos_sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, mask, None if past is None else past[i], cos_sin)
            presents.append(kv)
        return self.norm(x), presents


class Decoder(nn.Module):
    """`model.decoder.*` (OPT) or `model.*` (LLaMA family), plus `lm_head`, as in XForCausalLM."""

    def __init__(self, c: Config, source: Path | None = None):
        super().__init__()
        self.config = c
        self.source = source        # the model's directory (embed.py fingerprints its files)
        if c.model_type == "opt":   # HF nests OPT one level deeper: model.decoder.layers.0...
            self.model = nn.ModuleDict({"decoder": OPTDecoder(c)})
        else:
            self.model = LlamaModel(c)
        self.lm_head = nn.Linear(self.embeddings().embedding_dim, c.vocab_size, bias=False)

    @property
    def body(self) -> OPTDecoder | LlamaModel:
        return self.model.decoder if self.config.model_type == "opt" else self.model

    def embeddings(self) -> nn.Embedding:
        return self.body.embed_tokens

    def forward(self, input_ids, attention_mask=None, past=None, use_cache=False):
        """input_ids (B, T), attention_mask (B, T), 1 for real tokens (left padding) -> hidden
        states (B, T, H), and the key/value cache if use_cache. `past`: such a cache of a shared
        unpadded prefix, which every row continues."""
        B, T = input_ids.shape
        real = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).bool()
        P = 0 if past is None else past[0][0].shape[2]
        # Positions count real tokens: a left-padded row gets the positions it has alone.
        pos = (P + real.long().cumsum(-1) - 1).clamp(min=0)          # (B, T); pads: -1 -> 0
        # Causal, no padding keys; a pad query keeps its diagonal, so no row is all -inf.
        diagonal = torch.eye(T, dtype=torch.bool, device=real.device)
        mask = (real[:, None, :] | diagonal).tril()                              # (B, T, T)
        # Every row sees the whole prefix.
        mask = torch.cat([mask.new_ones(B, T, P), mask], dim=-1)[:, None]       # (B, 1, T, P+T)
        x, presents = self.body(input_ids, mask, pos, past)
        return (x, presents) if use_cache else x

    def lm_logits(self, hidden):                             # (B, T, H) -> (B, T, V)
        if self.lm_head is None:
            raise ModelError(f"{self.source} has no LM head (a base-model checkpoint): it embeds, "
                             f"but cannot predict")
        return self.lm_head(hidden)


def read_checkpoint(path: Path):
    """Yield (name, tensor) from safetensors (sharded or not), else .bin with weights_only."""
    from safetensors import SafetensorError, safe_open
    index = path / "model.safetensors.index.json"
    shards = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else ()
    files = [path / f for f in sorted(shards)] or sorted(path.glob("*.safetensors"))
    bins = [] if files else [p for p in sorted(path.glob("*.bin"))
                             if not p.name.startswith("training_args")]
    if not files and not bins:
        raise ModelError(f"no weights in {path}: expected *.safetensors or pytorch_model*.bin")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                yield from ((k, sf.get_tensor(k)) for k in sf.keys())
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{f} is corrupt or truncated ({e}): replace it with a good copy (the "
                             f"converted default model: delete its folder, and the next run "
                             f"converts it again)") from None
    for f in bins:      # pickles are never unpickled beyond plain tensors
        yield from torch.load(f, map_location="cpu", weights_only=True, mmap=True).items()


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
        raise ModelError(f"{file} has no {e.args[0]!r}: not a complete {cfg['model_type']} "
                         f"config") from None


def load(path, dtype=None, device=None, bits=None):
    """A local Hugging Face directory -> the Decoder, in eval mode. bits=4/8 quantizes the linears
    but the head (QLoRA's base); a base model (no LM head, untied) gets lm_head None."""
    if bits not in (None, 4, 8):
        raise ModelError(f"bits must be 4 or 8 (quantization; precision is dtype's), not {bits!r}")
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no such directory")
    c = read_config(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    dtype = dtype or torch.get_default_dtype()     # the CLIs pass support.cli.default_dtype's
    with torch.device("meta"):   # no memory until a checkpoint tensor is assigned
        model = Decoder(c, path)
    tied = {"lm_head.weight"} if c.tie_word_embeddings else set()
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
    seen = set()
    unexpected = []
    misshaped = []
    for name, t in read_checkpoint(path):
        if not name.startswith(("model.", "lm_head.")):     # saved from OPTModel or LlamaModel
            name = "model." + name
        if name not in expected:
            if name not in tied:                      # else a saved copy of the tied embedding
                unexpected.append(name)
            continue
        seen.add(name)                    # a mis-shaped tensor is reported as such, not as missing
        if tuple(t.shape) != tuple(expected[name]):
            misshaped.append(f"{name} {tuple(t.shape)} != {tuple(expected[name])}")
            continue
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        param = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)
        setattr(module, param_name, param)
        # QLoRA quantizes the blocks' linears (not the head) once their weight and bias are read.
        block_linear = isinstance(module, nn.Linear) and module_name != "lm_head"
        complete = not any(p.is_meta for p in module.parameters())
        if bits and block_linear and complete:
            model.set_submodule(module_name, quantize(module, bits, dtype, device))
    missing = sorted(set(expected) - seen - {"lm_head.weight"})
    problems = [("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)]
    parts = [f"{len(names)} {kind}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
             for kind, names in problems if names]
    if parts:
        raise ModelError(f"checkpoint {path} does not match its config.json: " + "; ".join(parts))
    if c.tie_word_embeddings:
        model.lm_head.weight = model.embeddings().weight
    elif "lm_head.weight" not in seen:
        model.lm_head = None                          # a base model: embeddings only
    model.eval().requires_grad_(False)
    return model


def quantize(lin: nn.Linear, bits, dtype, device):
    """nn.Linear -> bitsandbytes Linear4bit (NF4, double quantization, computing in dtype) or
    Linear8bitLt."""
    import logging      # else bitsandbytes warns on CPU that the `kernels` package is missing
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes as bnb
    has_bias = lin.bias is not None
    weight = lin.weight.data.cpu()
    if bits == 4:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias,
                              compute_dtype=dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        # Else eval mode repacks a CPU weight in place for a bf16 kernel with no backward, and
        # evaluation computes other numbers than training.
        q.support_avx512bf16_for_cpu = False
    else:
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias,
                                has_fp16_weights=False, device="meta")
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
    # Moving quantizes: else the first forward fails ("quantization state not initialized").
    return q.to(device)
