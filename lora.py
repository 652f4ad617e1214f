"""LoRA on any linear layer, QLoRA when the base is 4-bit, with adapters in PEFT's file format.

LoRA (Hu et al. 2021, arXiv:2106.09685, eq. 3): a frozen layer W0 learns an update of rank r,
    h = W0 x + (alpha / r) * B A x,      A: (r, in) Kaiming-uniform,  B: (out, r) zeros,
so training starts from the base model exactly. QLoRA (Dettmers et al. 2023, arXiv:2305.14314)
keeps W0 in 4-bit NF4 (model.load(..., bits=4)) and trains A, B in higher precision on every
linear layer of the blocks; PromptEOL fine-tuning (Jiang et al. 2023) uses r=64, alpha=16, dropout 0.05.

    m, tok = model.load("opt-2.7b", bits=4)
    add_lora(m); mark_only_lora_trainable(m)               # ... train ...
    save_adapter(m, "runs/a", "facebook/opt-2.7b")        # loads in PEFT: PeftModel.from_pretrained
    load_adapter(other, "royokong/prompteol-opt-2.7b")     # PEFT adapters load here

A wrapped layer keeps its name and holds `base_layer`, `lora_A`, `lora_B`, as PEFT's modules do (PEFT's
"lora_A.default" adapter name is dropped in its files, which prefix PeftModel's path "base_model.model."):
    adapter_model.safetensors: base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight (r, in)
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch import nn

PREFIX = "base_model.model."
CONFIG, WEIGHTS, WEIGHTS_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) @ A.T @ B.T * (alpha / r). `base` is nn.Linear, Linear4bit or Linear8bitLt."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, dtype=torch.float32):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, not {r}")
        dev = base.weight.device
        self.base_layer, self.r, self.alpha, self.scaling = base, r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # as PEFT (and nn.Linear) do
        nn.init.zeros_(self.lora_B.weight)                             # so the update starts at 0
        self.train(base.training)                                      # an eval model stays in eval mode

    def forward(self, x):
        y = self.base_layer(x)                                         # frozen W0 x (+ b), any precision
        # The low-rank update, in the adapter's dtype (fp32 even over a bf16 / 4-bit base, like PEFT).
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return y + (delta * self.scaling).to(y.dtype)


def _lora_layers(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _linears(model) -> list[str]:
    """Names of the linear layers LoRA can wrap (bitsandbytes layers subclass nn.Linear)."""
    if _lora_layers(model):
        raise ValueError("the model already has LoRA layers: merge_lora() first, or load a fresh model")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _peft_match(names, targets) -> list[str]:
    """PEFT's target_modules rule: "all-linear", a regex (str, full match), or names / name suffixes."""
    if targets == "all-linear":                 # every linear of the blocks (PEFT: all but the LM head)
        return [n for n in names if ".layers." in n]
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def add_lora(model, r: int = 64, alpha: float = 16, dropout: float = 0.05, targets="all-linear",
             dtype=torch.float32):
    """Wrap the targeted linears ("all-linear": those of the decoder blocks; or name suffixes such as
    ["q_proj", "v_proj"]) in LoRALinear. Returns the model; see mark_only_lora_trainable."""
    names = _linears(model)
    for t in [targets] if isinstance(targets, str) else targets:
        if not _peft_match(names, t if isinstance(targets, str) else [t]):
            raise ValueError(f"LoRA target {t!r} matches no linear layer of the model")
    for n in _peft_match(names, targets):
        model.set_submodule(n, LoRALinear(model.get_submodule(n), r, alpha, dropout, dtype))
    return model


def mark_only_lora_trainable(model):
    model.requires_grad_(False)
    for m in _lora_layers(model).values():
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    return model


def _dequantized(base, dtype) -> nn.Linear:
    """A float nn.Linear copy of a bitsandbytes Linear4bit or Linear8bitLt."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant
    if isinstance(base, bnb.nn.Linear4bit):
        w = dequantize_4bit(base.weight.data, base.weight.quant_state)
    else:                                       # Linear8bitLt: the row scales move to .state at the first forward
        scb = base.weight.SCB if base.weight.SCB is not None else base.state.SCB
        w = int8_vectorwise_dequant(base.weight.data, scb)
    lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    if base.bias is not None:
        lin.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
    return lin


@torch.no_grad()
def merge_lora(model, dequantize: bool = False):
    """W = W0 + (alpha / r) B A, and the wrappers removed: a plain model, no adapter overhead.
    A quantized W0 cannot absorb the update; dequantize=True merges into a float copy (full-size)."""
    dtype = next((p.dtype for n, p in model.named_parameters()   # the model's float dtype, for dequantized copies
                  if p.is_floating_point() and "lora_" not in n), torch.float32)
    layers = _lora_layers(model)
    quantized = [(n, type(m.base_layer).__name__) for n, m in layers.items() if type(m.base_layer) is not nn.Linear]
    if quantized and not dequantize:   # checked before anything changes
        raise ValueError(f"{quantized[0][0]} wraps a {quantized[0][1]}: merging needs a float copy of its "
                         f"weight (full-precision memory); pass dequantize=True to do that")
    for name, m in layers.items():
        base = m.base_layer if type(m.base_layer) is nn.Linear else _dequantized(m.base_layer, dtype)
        base.weight += (m.lora_B.weight @ m.lora_A.weight * m.scaling).to(base.weight.dtype)
        model.set_submodule(name, base)
    return model


# ----------------------------------------------------------------------------- PEFT files
def save_adapter(model, out_dir, base_model_name: str | None = None):
    """adapter_config.json + adapter_model.safetensors, as PeftModel.save_pretrained writes them.
    Atomic: written to a temporary sibling directory, then renamed into place."""
    from safetensors.torch import save_file
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save (add_lora or load_adapter first)")
    tensors = {f"{PREFIX}{n}.lora_{x}.weight": getattr(m, f"lora_{x}").weight.detach().cpu().contiguous()
               for n, m in layers.items() for x in "AB"}
    r, alpha = (Counter(getattr(m, k) for m in layers.values()).most_common(1)[0][0] for k in ("r", "alpha"))
    dropout = next((m.lora_dropout.p for m in layers.values() if isinstance(m.lora_dropout, nn.Dropout)), 0.0)
    suffixes = sorted({n.rpartition(".")[2] for n in layers})   # PEFT matches a name or its suffix
    names = [n for n, mod in model.named_modules() if isinstance(mod, (nn.Linear, LoRALinear))
             and not n.endswith((".base_layer", ".lora_A", ".lora_B"))]
    exact = set(_peft_match(names, suffixes)) == set(layers)   # else: the full names
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
              "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": suffixes if exact else sorted(layers),
              "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
              "alpha_pattern": {n: m.alpha for n, m in layers.items() if m.alpha != alpha},
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None}
    out = Path(out_dir)
    if out.exists() and not {p.name for p in out.iterdir()} <= {CONFIG, WEIGHTS, WEIGHTS_BIN, "README.md"}:
        raise ValueError(f"{out} exists and holds more than an adapter: refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)   # mkdtemp makes it private
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():   # swap: a crash leaves the old adapter or the new one, never a mix
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _resolve(source) -> Path:
    if os.path.isdir(source):
        return Path(source)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) or str(source).startswith((".", "/")):
        raise ValueError(f"adapter not found: {source} is neither a local directory nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(source), allow_patterns=[CONFIG, WEIGHTS, WEIGHTS_BIN]))
    except Exception as e:   # offline, unknown or gated repo: one clear line
        msg = (str(e).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"adapter {source!r}: no such local directory, and it could not be fetched from the "
                         f"Hugging Face Hub ({type(e).__name__}: {msg}). Pass a local adapter directory.") from None


UNSUPPORTED = ("use_dora", "use_rslora", "lora_bias", "fan_in_fan_out", "modules_to_save", "layer_replication",
               "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora",
               "velora_config", "monteclora_config", "kasa_config", "arrow_config", "megatron_config")


def load_adapter(model, source, dtype=torch.float32):
    """Add a PEFT LoRA adapter (local directory or hub id) to exactly the modules its file names."""
    path = _resolve(source)
    if not (path / CONFIG).exists():
        raise ValueError(f"{path} is not a PEFT adapter: no {CONFIG}")
    cfg = json.loads((path / CONFIG).read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {source}: peft_type {cfg['peft_type']!r} is not supported (only LORA)")
    bad = [k for k in UNSUPPORTED if cfg.get(k)]
    bad += [f"bias={cfg['bias']}"] if cfg.get("bias") not in (None, "none") else []
    if bad:
        raise ValueError(f"adapter {source} uses {', '.join(bad)}: not supported by lora.py (plain LoRA only)")
    if not (path / WEIGHTS).exists() and not (path / WEIGHTS_BIN).exists():
        raise ValueError(f"{path} has no {WEIGHTS} or {WEIGHTS_BIN}")
    from safetensors.torch import load_file   # older adapters ship a pickle: read as plain tensors only
    sd = (load_file(str(path / WEIGHTS)) if (path / WEIGHTS).exists()
          else torch.load(path / WEIGHTS_BIN, map_location="cpu", weights_only=True))
    names = _linears(model)
    mods, pairs = dict(model.named_modules()), {}
    for key, t in sd.items():   # base_model.model.<name>.lora_A[.<adapter name>].weight
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise ValueError(f"adapter {source}: unexpected tensor {key} (only LoRA A/B weights are supported)")
        name = m[1] if m[1] in mods or "model." + m[1] not in mods else "model." + m[1]  # saved from XModel
        if name not in names:
            raise ValueError(f"adapter {source} does not match this model: it adapts {m[1]}, which the model "
                             f"does not have as a linear layer (adapter for another base model?)")
        pairs.setdefault(name, {})[m[2]] = t
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    def pattern(p, name, default):   # PEFT: the first key k with re.match(rf"(.*\.)?({k})$", name)
        return next((v for k, v in p.items() if re.match(rf"(.*\.)?({k})$", name)), default)
    plan = {}
    for name, ab in pairs.items():
        lin, r = mods[name], pattern(rp, name, cfg["r"])
        for x, want in (("A", (r, lin.in_features)), ("B", (lin.out_features, r))):
            got = f"has shape {tuple(ab[x].shape)}" if x in ab else "is missing"
            if x not in ab or tuple(ab[x].shape) != want:
                raise ValueError(f"adapter {source} does not match this model: {name}.lora_{x}.weight {got}, "
                                 f"expected {want} (r={r}, base {lin.out_features}x{lin.in_features})")
        plan[name] = (r, pattern(ap, name, cfg["lora_alpha"]))
    targets = cfg.get("target_modules")   # every module the config targets must have weights in the file
    if targets and not cfg.get("layers_to_transform") and not cfg.get("exclude_modules"):
        missing = [n for n in _peft_match(names, targets) if n not in plan and n != "lm_head"]
        if missing:
            raise ValueError(f"adapter {source} does not match this model: its target_modules cover {missing[0]}"
                             f" but it has no weights for it ({len(missing)} such modules; a deeper base model?)")
    for name, (r, alpha) in plan.items():
        lora = LoRALinear(mods[name], r, alpha, cfg.get("lora_dropout") or 0.0, dtype)
        lora.load_state_dict({f"lora_{x}.weight": pairs[name][x] for x in "AB"}, strict=False)   # copies, casts
        model.set_submodule(name, lora)
    return model
