"""LoRA on any linear layer, QLoRA when the base is 4-bit, with adapters in PEFT's file format.

LoRA (Hu et al. 2021, arXiv:2106.09685, eq. 3): a frozen layer W0 learns an update of rank r,
    h = W0 x + (alpha / r) * B A x,      A: (r, in) Kaiming-uniform,  B: (out, r) zeros,
so training starts from the base model exactly. QLoRA (Dettmers et al. 2023, arXiv:2305.14314) keeps W0
in 4-bit NF4 (model.load(..., bits=4)) and trains A, B in higher precision on every linear layer of the
blocks; PromptEOL fine-tuning (Jiang et al. 2023) uses r=64, alpha=16, dropout 0.05.

    m, tok = model.load("opt-2.7b", bits=4)
    add_lora(m); mark_only_lora_trainable(m)               # ... train ...
    save_adapter(m, "runs/a", "facebook/opt-2.7b")        # loads in PEFT: PeftModel.from_pretrained
    load_adapter(other, "royokong/prompteol-opt-2.7b")     # PEFT adapters load here

A wrapped layer keeps its name and holds `base_layer`, `lora_A`, `lora_B` as in PEFT, whose files name them
    base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight   (r, in)
"""
import json
import math
import re
from pathlib import Path

from support.cli import UserError
import torch  # after support.cli: it sets OpenMP's waiting policy before torch loads
from support.files import atomic
from support.hub import hub_snapshot
from torch import nn

FILES = CONFIG, WEIGHTS, WEIGHTS_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B A dropout(x). `base` is nn.Linear, Linear4bit or Linear8bitLt (frozen)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, dtype=torch.float32):
        super().__init__()
        self.base_layer, self.r, self.alpha, self.scaling = base, r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=dtype)   # (r, in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=dtype)  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # as PEFT (and nn.Linear) do
        nn.init.zeros_(self.lora_B.weight)                             # so the update starts at 0
        self.train(base.training)                                      # an eval model stays in eval mode

    def forward(self, x):                                              # x: (..., in)
        y = self.base_layer(x)                                         # frozen W0 x (+ b), any precision: (..., out)
        # The low-rank update runs in the adapter's dtype (fp32 even over a bf16 or 4-bit base, as in PEFT).
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))   # (..., out)
        return y + (delta * self.scaling).to(y.dtype)


def add_lora(model, r: int = 64, alpha: float = 16, dropout: float = 0.05, targets="all-linear", dtype=torch.float32):
    """Wrap the targeted linears in LoRALinear: "all-linear" (every one but the LM head), a regex, or
    name suffixes such as ["q_proj", "v_proj"]. Returns the model; see mark_only_lora_trainable."""
    names = _linears(model)
    for t in [targets] if isinstance(targets, str) else targets:
        if not _peft_match(names, t if isinstance(targets, str) else [t]):
            raise UserError(f"LoRA target {t!r} matches no linear layer of the model")
    for n in _peft_match(names, targets):
        model.set_submodule(n, LoRALinear(model.get_submodule(n), r, alpha, dropout, dtype))
    return model


def mark_only_lora_trainable(model):
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    return model


@torch.no_grad()
def merge_lora(model, dequantize: bool = False):
    """W = W0 + (alpha / r) B A, and the wrappers removed: a plain model, no adapter overhead.
    A quantized W0 cannot absorb the update; dequantize=True merges into a float copy (full-size)."""
    layers = _lora_layers(model)
    quantized = [n for n, m in layers.items() if type(m.base_layer) is not nn.Linear]
    if quantized and not dequantize:   # checked before anything changes
        raise UserError(f"{quantized[0]} wraps a {type(layers[quantized[0]].base_layer).__name__}: merging needs a "
                        f"float copy of its weight (full-precision memory); pass dequantize=True to do that")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())   # the embeddings': for float copies
    for name, m in layers.items():
        base = _dequantized(m.base_layer, dtype) if name in quantized else m.base_layer
        base.weight += (m.lora_B.weight @ m.lora_A.weight * m.scaling).to(base.weight.dtype)   # (out, in)
        model.set_submodule(name, base)
    return model


def _lora_layers(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _linears(model) -> list[str]:
    """Names of the linear layers LoRA can wrap (bitsandbytes layers subclass nn.Linear)."""
    if _lora_layers(model):
        raise UserError("the model already has LoRA layers: merge_lora() first, or load a fresh model")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _peft_match(names, targets) -> list[str]:
    """PEFT's target_modules rule: "all-linear", a regex (str, full match), or names / name suffixes."""
    if targets == "all-linear":                 # as PEFT: every linear but the LM head (opt-350m: project_in/out too)
        return [n for n in names if n != "lm_head"]
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def _dequantized(base, dtype) -> nn.Linear:
    """A float nn.Linear copy of a bitsandbytes Linear4bit or Linear8bitLt."""
    from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant
    if hasattr(base.weight, "quant_state"):   # Linear4bit
        w = dequantize_4bit(base.weight.data, base.weight.quant_state)
    else:   # Linear8bitLt: the row scales move to .state at the first forward
        w = int8_vectorwise_dequant(base.weight.data, base.state.SCB if base.weight.SCB is None else base.weight.SCB)
    lin = nn.Linear(base.in_features, base.out_features, device="meta")
    lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    lin.bias = None if base.bias is None else nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
    return lin


# ----------------------------------------------------------------------------- PEFT files
def save_adapter(model, out_dir, base_model_name: str | None = None):
    """adapter_config.json + adapter_model.safetensors as PeftModel.save_pretrained writes them, atomically."""
    from safetensors.torch import save_file
    layers = _lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA layers to save (add_lora or load_adapter first)")
    tensors = {f"base_model.model.{n}.lora_{x}.weight": getattr(m, f"lora_{x}").weight.detach().cpu().contiguous()
               for n, m in layers.items() for x in "AB"}
    r, alpha = (max(v, key=v.count) for v in ([m.r for m in layers.values()], [m.alpha for m in layers.values()]))
    dropout = next((m.lora_dropout.p for m in layers.values() if isinstance(m.lora_dropout, nn.Dropout)), 0.0)
    suffixes = sorted({n.rpartition(".")[2] for n in layers})   # PEFT matches a name or its suffix
    exact = set(_peft_match([n for n, _ in model.named_modules()], suffixes)) == set(layers)   # else: full names
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
              "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "inference_mode": True,
              "target_modules": suffixes if exact else sorted(layers),
              "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
              "alpha_pattern": {n: m.alpha for n, m in layers.items() if m.alpha != alpha}}
    out = Path(out_dir)
    if out.exists() and not {p.name for p in out.iterdir()} <= {*FILES, "README.md"}:
        raise UserError(f"{out} exists and holds more than an adapter: refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic(out) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


# PEFT config keys load_adapter follows, metadata, and narrowings of the targets (the file names the layers).
ANY_VALUE = {"r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern",
             "layers_to_transform", "layers_pattern", "exclude_modules", "task_type", "base_model_name_or_path",
             "revision", "inference_mode", "auto_mapping", "peft_version", "megatron_core", "qalora_group_size"}
ONLY = {"peft_type": ("LORA",), "bias": ("none",),   # initializations that leave the base weights alone:
        "init_lora_weights": (True, False, "gaussian", "orthogonal")}


def load_adapter(model, source, dtype=torch.float32):
    """Add a PEFT LoRA adapter (local directory or hub id) to exactly the modules its file names."""
    path = Path(source) if Path(source).is_dir() else hub_snapshot(str(source), list(FILES), "adapter")
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:   # missing, unreadable or not JSON
        raise UserError(f"{path} is not a PEFT adapter: {CONFIG}: {getattr(e, 'strerror', None) or e}") from None
    for k, v in cfg.items():   # any other key (DoRA, rsLoRA, modules_to_save, ...) must be off
        if k not in ANY_VALUE and v not in ONLY.get(k, (None, False, "", [], {})):
            raise UserError(f"adapter {source}: {k}={v!r} is not supported by lora.py (plain LoRA only)")
    if not (path / WEIGHTS).exists() and not (path / WEIGHTS_BIN).exists():
        raise UserError(f"{path} has no {WEIGHTS} or {WEIGHTS_BIN}")
    from safetensors.torch import load_file   # older adapters ship a pickle: read as plain tensors only
    sd = (load_file(str(path / WEIGHTS)) if (path / WEIGHTS).exists()
          else torch.load(path / WEIGHTS_BIN, map_location="cpu", weights_only=True))
    names, mods, pairs = _linears(model), dict(model.named_modules()), {}
    for key, t in sd.items():   # base_model.model.<name>.lora_A[.<adapter name>].weight
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise UserError(f"adapter {source}: unexpected tensor {key} (only LoRA A/B weights are supported)")
        name = m[1] if m[1] in mods or "model." + m[1] not in mods else "model." + m[1]  # saved from XModel
        if name not in names:
            raise UserError(f"adapter {source} does not match this model: it adapts {m[1]}, which the model "
                            f"does not have as a linear layer (adapter for another base model?)")
        pairs.setdefault(name, {})[m[2]] = t
    # Every module the config targets has weights in the file, unless the config narrows its targets further.
    targets = [] if cfg.get("layers_to_transform") or cfg.get("exclude_modules") else cfg.get("target_modules") or []
    missing = [n for n in _peft_match(names, targets) if n not in pairs and n != "lm_head"]
    if missing:
        raise UserError(f"adapter {source} does not match this model: its target_modules cover {missing[0]}"
                        f" but it has no weights for it ({len(missing)} such modules; a deeper base model?)")

    def pattern(key, name, default):   # PEFT: the first k with re.match(rf"(.*\.)?({k})$", name)
        return next((v for k, v in (cfg.get(key) or {}).items() if re.match(rf"(.*\.)?({k})$", name)), default)
    for name, ab in pairs.items():   # every layer is checked before the model changes
        lin, r = mods[name], pattern("rank_pattern", name, cfg["r"])
        for x, want in (("A", (r, lin.in_features)), ("B", (lin.out_features, r))):
            if x not in ab or tuple(ab[x].shape) != want:
                got = f"has shape {tuple(ab[x].shape)}" if x in ab else "is missing"
                raise UserError(f"adapter {source} does not match this model: {name}.lora_{x}.weight {got}, "
                                f"expected {want} (r={r}, base {lin.out_features}x{lin.in_features})")
    for name, ab in pairs.items():
        r, alpha = pattern("rank_pattern", name, cfg["r"]), pattern("alpha_pattern", name, cfg["lora_alpha"])
        lora = LoRALinear(mods[name], r, alpha, cfg.get("lora_dropout") or 0.0, dtype)
        lora.load_state_dict({f"lora_{x}.weight": ab[x] for x in "AB"}, strict=False)   # copies, casts
        model.set_submodule(name, lora)
    return model
