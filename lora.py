"""LoRA on any linear layer, QLoRA when the base is 4-bit, with adapters in PEFT's file format.

LoRA (Hu et al. 2021, arXiv:2106.09685, eq. 3): a frozen layer W0 learns an update of rank r,
    h = W0 x + (alpha / r) * B A x,      A: (r, in) Kaiming-uniform,  B: (out, r) zeros,
so training starts from the base model exactly. QLoRA (Dettmers et al. 2023, arXiv:2305.14314)
keeps W0 in 4-bit NF4 (model.load(..., bits=4)) and trains A, B in higher precision on every linear
layer of the blocks; PromptEOL fine-tuning (Jiang et al. 2023) uses r=64, alpha=16, dropout 0.05.

    m = model.load(hub.resolve("opt-2.7b"), bits=4)
    add_lora(m); mark_only_lora_trainable(m)               # ... train ...
    save_adapter(m, "runs/a", "facebook/opt-2.7b")        # loads in PEFT: PeftModel.from_pretrained
    load_adapter(other, "royokong/prompteol-opt-2.7b")     # PEFT adapters load here

Mixed precision, as the reference trains under autocast: set_compute_dtype(m, torch.bfloat16) runs
the update's matmuls in bf16 while A, B, their gradients and the optimizer state stay fp32.
dequantize_base(m) trades a 4-bit base's memory for speed: its weights are dequantized once.

A wrapped layer keeps its name and holds `base_layer`, `lora_A`, `lora_B` as in PEFT, whose
files name them as in
    base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight   (r, in)
"""
import json
import os
import math
import re
import sys
from pathlib import Path

from support.cli import UserError
import torch  # after support.cli: it sets OpenMP's waiting policy before torch loads
import torch.nn.functional as F
from support.files import atomic
from support.hub import hub_snapshot
from torch import nn

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"           # older PEFT: a pickle, read as plain tensors only
FILES = [CONFIG, WEIGHTS, WEIGHTS_BIN]


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B A dropout(x). `base` is nn.Linear, Linear4bit or Linear8bitLt
    (frozen). A and B live in `dtype` (fp32); the update computes in `compute_dtype`, None meaning
    A and B's own dtype (fp32 even over a bf16 or 4-bit base, as in PEFT)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 dtype=torch.float32):
        super().__init__()
        self.base_layer = base
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.compute_dtype = None
        self.lora_dropout = LoRADropout(dropout) if dropout else nn.Identity()
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # as PEFT (and nn.Linear) do
        nn.init.zeros_(self.lora_B.weight)                             # so the update starts at 0
        self.train(base.training)                                      # an eval model stays in eval

    def forward(self, x):                                # x: (..., in)
        rows = x.reshape(-1, x.shape[-1])                # (n, in)
        y = self.base_layer(rows)                        # frozen W0 x (+ b), any dtype: (n, out)
        dtype = self.compute_dtype or self.lora_A.weight.dtype
        # Casting the weights per call, as autocast does, keeps A and B (and their gradients) in
        # their own dtype while the matmuls run in the compute dtype. The scaling goes into B's
        # copy: an (out, r) product, not one the size of the output.
        a = self.lora_A.weight.to(dtype)                              # (r, in)
        b = (self.lora_B.weight * self.scaling).to(dtype)             # (out, r)
        h = F.linear(self.lora_dropout(rows.to(dtype)), a)            # (n, r)
        if y.dtype == dtype:
            # y += h b^T inside the GEMM, in place: y is the base's fresh output, which no
            # backward keeps (autograd would refuse the step otherwise)
            y.addmm_(h, b.t())
        else:
            y = y + F.linear(h, b).to(y.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])        # (..., out)


class LoRADropout(nn.Dropout):
    """nn.Dropout (each element zeroed with probability p, independently; the rest scaled by
    1 / (1 - p)) that, on a CPU, draws only the gaps between zeroed elements: about p n random
    numbers instead of n. A CPU draws random numbers one at a time on one core: n of them cost
    more than the layer's LoRA matmuls. Other devices keep nn.Dropout's fused kernel."""

    def forward(self, x):
        if not self.training or self.p == 0 or self.p >= 1 or x.device.type != "cpu":
            return super().forward(x)
        y = x.reshape(-1) * (1 / (1 - self.p))                       # (n,): a new tensor
        y.index_fill_(0, dropped(y.numel(), self.p), 0)
        return y.view(x.shape)


def dropped(n: int, p: float) -> torch.Tensor:
    """Sorted positions in range(n) that i.i.d. Bernoulli(p) trials hit, from the default
    generator: the gaps between hits are geometric, P(gap > k) = (1 - p)^k, drawn by inversion
    from float64 uniforms (exact to 2^-53)."""
    mean = n * p
    m = int(mean + 6 * math.sqrt(mean) + 16)          # enough gaps to pass n, but for 1e-9
    parts = []
    end = -1                                          # the last hit so far
    while end < n:
        u = torch.rand(m, dtype=torch.float64)                       # [0, 1)
        # (1 - u is exact in float64, and log is vectorized where log1p is not)
        gaps = torch.floor(torch.log(1 - u) / math.log1p(-p)).long() + 1   # >= 1, (m,)
        parts.append(end + gaps.cumsum(0))
        end = int(parts[-1][-1])
    hits = parts[0] if len(parts) == 1 else torch.cat(parts)
    return hits[:int(torch.searchsorted(hits, n))]                # the hits below n


def add_lora(model, r: int = 64, alpha: float = 16, dropout: float = 0.05, targets="all-linear",
             dtype=torch.float32):
    """Wrap the targeted linears in LoRALinear: "all-linear" (every one but the LM head), a regex,
    or name suffixes such as ["q_proj", "v_proj"]. Returns the model (mark_only_lora_trainable
    freezes the rest)."""
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


def set_compute_dtype(model, dtype):
    """Run every LoRA update's matmuls in `dtype` (None: in A and B's own dtype, fp32). bfloat16 is
    the reference's autocast: fast where bf16 is native (GPUs, AMX or AVX512-BF16 CPUs), while A, B,
    their gradients and the optimizer's state stay fp32."""
    for m in _lora_layers(model).values():
        m.compute_dtype = dtype
    return model


@torch.no_grad()
def dequantize_base(model) -> int:
    """Replace each 4-bit base layer by an nn.Linear holding its weight dequantized into the layer's
    compute dtype: the numbers bitsandbytes dequantizes on every call, computed once, at the memory
    of a bf16 (or fp32) base. Returns how many layers it replaced."""
    import bitsandbytes as bnb
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    for name in quantized:
        base = model.get_submodule(name)
        model.set_submodule(name, _dequantized(base, base.compute_dtype or _float_dtype(model)))
    return len(quantized)


def set_precision(model, dev, dtype, say=True):
    """LoRA computes in the base's dtype over fp32 weights (the reference's autocast). On a CPU, a
    4-bit base is dequantized once into that dtype where it takes under half the free memory: the
    numbers bitsandbytes makes on every call. GPUs keep QLoRA's per-call path, saving memory."""
    set_compute_dtype(model, dtype)
    quantized = [m for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state")]
    size = sum(m.weight.quant_state.shape.numel() for m in quantized) * dtype.itemsize
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    once = dev.type == "cpu" and 0 < size < free / 2
    if once:
        dequantize_base(model)
    why = "on a GPU" if dev.type != "cpu" else "under half the free memory"
    if not once and dev.type == "cpu":
        why = "over half the free memory"
    path = "dequantized once" if once else "dequantized on every call (QLoRA)"
    name = str(dtype).removeprefix("torch.")
    if say and quantized:
        print(f"4-bit base ({size / 2**30:.2f} GiB in {name}, {why}): {path}; "
              f"LoRA computes in {name} over fp32 weights", file=sys.stderr)


@torch.no_grad()
def merge_lora(model, dequantize: bool = False):
    """W = W0 + (alpha / r) B A, and the wrappers removed: a plain model, no adapter overhead.
    A quantized W0 cannot absorb the update; dequantize=True merges into a full-size float copy."""
    layers = _lora_layers(model)
    quantized = [n for n, m in layers.items() if type(m.base_layer) is not nn.Linear]
    if quantized and not dequantize:   # checked before anything changes
        kind = type(layers[quantized[0]].base_layer).__name__
        raise UserError(f"{quantized[0]} wraps a {kind}: merging needs a float copy of its weight "
                        f"(full-precision memory); pass dequantize=True to do that")
    dtype = _float_dtype(model)
    for name, m in layers.items():
        base = _dequantized(m.base_layer, dtype) if name in quantized else m.base_layer
        update = m.lora_B.weight @ m.lora_A.weight * m.scaling                 # (out, in)
        base.weight += update.to(base.weight.dtype)
        model.set_submodule(name, base)
    return model


def _lora_layers(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _float_dtype(model) -> torch.dtype:
    """The dtype of the model's float weights (the embeddings'), for float copies of 4-bit ones."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _linears(model) -> list[str]:
    """Names of the linear layers LoRA can wrap (bitsandbytes layers subclass nn.Linear)."""
    if _lora_layers(model):
        raise UserError("the model already has LoRA layers: merge_lora() first, or load a fresh "
                        "model")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _peft_match(names, targets) -> list[str]:
    """PEFT's target_modules rule: "all-linear", a regex (str, full match), or names / suffixes."""
    if targets == "all-linear":   # as PEFT: every linear but the LM head (opt-350m: project_in/out)
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
        scales = base.state.SCB if base.weight.SCB is None else base.weight.SCB
        w = int8_vectorwise_dequant(base.weight.data, scales)
    has_bias = base.bias is not None
    lin = nn.Linear(base.in_features, base.out_features, bias=has_bias, device="meta")
    lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    if has_bias:
        lin.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
    return lin


# ----------------------------------------------------------------------------- PEFT files
def save_adapter(model, out_dir, base_model_name: str | None = None):
    """adapter_config.json + adapter_model.safetensors as PeftModel.save_pretrained writes them,
    atomically."""
    from safetensors.torch import save_file
    layers = _lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA layers to save (add_lora or load_adapter first)")
    tensors = {}
    for n, m in layers.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        tensors[f"base_model.model.{n}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    # The most common rank and alpha; the layers that differ go to rank_pattern / alpha_pattern.
    ranks = [m.r for m in layers.values()]
    alphas = [m.alpha for m in layers.values()]
    r = max(ranks, key=ranks.count)
    alpha = max(alphas, key=alphas.count)
    dropouts = [m.lora_dropout.p for m in layers.values() if isinstance(m.lora_dropout, nn.Dropout)]
    # PEFT matches a name or its suffix: suffixes if they select exactly these layers, else names.
    suffixes = sorted({n.rpartition(".")[2] for n in layers})
    exact = set(_peft_match([n for n, _ in model.named_modules()], suffixes)) == set(layers)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropouts[0] if dropouts else 0.0,
        "bias": "none", "inference_mode": True,
        "target_modules": suffixes if exact else sorted(layers),
        "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {n: m.alpha for n, m in layers.items() if m.alpha != alpha},
    }
    out = Path(out_dir)
    if out.exists() and not {p.name for p in out.iterdir()} <= {*FILES, "README.md"}:
        raise UserError(f"{out} exists and holds more than an adapter: refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic(out) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


# PEFT config keys load_adapter follows, metadata, and narrowings of the targets (the file names
# the layers).
ANY_VALUE = {"r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern",
             "layers_to_transform", "layers_pattern", "exclude_modules", "task_type",
             "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
             "peft_version", "megatron_core", "qalora_group_size"}
# Keys with the values load_adapter accepts: initializations that leave the base weights alone.
ONLY = {"peft_type": ("LORA",), "bias": ("none",),
        "init_lora_weights": (True, False, "gaussian", "orthogonal")}
OFF = (None, False, "", [], {})     # any other key (DoRA, rsLoRA, modules_to_save, ...) must be off


def load_adapter(model, source, dtype=torch.float32):
    """Add a PEFT LoRA adapter (local directory or hub id) to exactly the modules its file names."""
    if Path(source).is_dir():
        path = Path(source)
    else:
        path = hub_snapshot(str(source), FILES, "adapter")
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:   # missing, unreadable or not JSON
        reason = getattr(e, "strerror", None) or e
        raise UserError(f"{path} is not a PEFT adapter: {CONFIG}: {reason}") from None
    for k, v in cfg.items():
        if k not in ANY_VALUE and v not in ONLY.get(k, OFF):
            raise UserError(f"adapter {source}: {k}={v!r} is not supported by lora.py (plain LoRA "
                            f"only)")
    if (path / WEIGHTS).exists():
        from safetensors.torch import load_file
        sd = load_file(str(path / WEIGHTS))
    elif (path / WEIGHTS_BIN).exists():
        sd = torch.load(path / WEIGHTS_BIN, map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{path} has no {WEIGHTS} or {WEIGHTS_BIN}")
    names = _linears(model)
    modules = dict(model.named_modules())
    pairs = {}                    # layer name -> {"A": tensor, "B": tensor}
    for key, t in sd.items():     # base_model.model.<name>.lora_A[.<adapter name>].weight
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise UserError(f"adapter {source}: unexpected tensor {key} (only LoRA A/B weights are "
                            f"supported)")
        name = m[1]
        if name not in modules and "model." + name in modules:    # saved from XModel
            name = "model." + name
        if name not in names:
            raise UserError(f"adapter {source} does not match this model: it adapts {m[1]}, which "
                            f"the model does not have as a linear layer (adapter for another base "
                            f"model?)")
        pairs.setdefault(name, {})[m[2]] = t
    # Every module the config targets has weights in the file, unless the config narrows its
    # targets further.
    narrowed = cfg.get("layers_to_transform") or cfg.get("exclude_modules")
    targets = [] if narrowed else cfg.get("target_modules") or []
    missing = [n for n in _peft_match(names, targets) if n not in pairs and n != "lm_head"]
    if missing:
        raise UserError(f"adapter {source} does not match this model: its target_modules cover "
                        f"{missing[0]} but it has no weights for it ({len(missing)} such modules; "
                        f"a deeper base model?)")

    def pattern(key, name, default):   # PEFT: the first k with re.match(rf"(.*\.)?({k})$", name)
        for k, v in (cfg.get(key) or {}).items():
            if re.match(rf"(.*\.)?({k})$", name):
                return v
        return default

    for name, ab in pairs.items():   # every layer is checked before the model changes
        lin = modules[name]
        r = pattern("rank_pattern", name, cfg["r"])
        for x, want in (("A", (r, lin.in_features)), ("B", (lin.out_features, r))):
            if x not in ab or tuple(ab[x].shape) != want:
                got = f"has shape {tuple(ab[x].shape)}" if x in ab else "is missing"
                raise UserError(f"adapter {source} does not match this model: {name}.lora_{x}"
                                f".weight {got}, expected {want} (r={r}, base "
                                f"{lin.out_features}x{lin.in_features})")
    for name, ab in pairs.items():
        r = pattern("rank_pattern", name, cfg["r"])
        alpha = pattern("alpha_pattern", name, cfg["lora_alpha"])
        lora = LoRALinear(modules[name], r, alpha, cfg.get("lora_dropout") or 0.0, dtype)
        weights = {"lora_A.weight": ab["A"], "lora_B.weight": ab["B"]}
        lora.load_state_dict(weights, strict=False)   # copies, casts to A and B's dtype
        model.set_submodule(name, lora)
    return model


# python lora.py merge --model M --adapter A --output DIR: a merged Hugging Face folder
# (support/export.py).
if __name__ == "__main__":
    import sys

    import model as M
    from support import export
    from support.cli import cli
    sys.exit(cli(lambda argv: export.main(argv, load=M.load, load_adapter=load_adapter,
                                          merge_lora=merge_lora)))
