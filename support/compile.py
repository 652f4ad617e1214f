"""Used by embed (the Embedder's compiled path): whether torch.compile works here, where its cache
lives, when compiling pays, and the compiled decoder.

The decoder's own forward (model.Decoder.forward, the code a reader reads) runs through
torch.compile with inductor, which fuses the work between the matrix products (norms, RoPE, the
mask, SwiGLU, residual adds) into generated kernels. Its batch, length and prefix dimensions are
symbolic, so one graph serves every batch of a run and every cached prefix: `warm_up` builds it on
a dummy batch, before the first real one. Dynamo specializes a dimension of size 1, so a batch of
one sentence runs eager, as do the rare prompts that do not continue the cached prefix: a run
builds one graph.

On the CPU the weights are frozen into the graph while it is built: inductor takes them for
constants, packs them once for oneDNN's kernels and its own AMX/AVX-512 matrix-product templates
(choosing between them by timing each product at the warm-up's sizes), and fuses SiLU, the
gate's product and the residual adds into the products.

Inductor writes C++ on the CPU (a C++ compiler must be installed) and Triton on GPUs; where that is
missing, `unavailable` says why and the Embedder runs eager. The generated code goes to a
persistent cache (torch's FX graph and AOTAutograd caches, under <sentemb cache>/compile unless
$TORCHINDUCTOR_CACHE_DIR is set): a second run loads the kernels instead of building them, except
for graphs holding oneDNN-packed weights (the CPU's frozen graph), which torch does not store.
"""
import os
import time
import warnings

from support.files import cache_root

# Sentences from which compiling pays on the CPU: the compile time (every run: the frozen graph is
# not cached) over the time the compiled forward saves per sentence, with and without the default
# demonstration (bench/embed.py measures both; bench/README.md has the numbers). Auto never
# compiles on GPUs, whose eager forward leaves compiling little to save on inputs this size.
BREAK_EVEN = 100_000


def unavailable(model) -> str | None:
    """Why the decoder cannot be compiled here (one line), or None."""
    try:
        import torch._inductor.config as inductor_config
        from torch._inductor import exc
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError as e:
        return f"this torch has no inductor ({e})"
    devices = {p.device.type for p in model.parameters()}
    if len({p.device for p in model.parameters()}) > 1:
        return "the model spans several devices"
    if any(type(m).__module__.startswith("bitsandbytes") for m in model.modules()):
        return "bitsandbytes' quantized layers do not compile"
    if "cuda" in devices:
        from torch.utils._triton import has_triton
        return None if has_triton() else "inductor needs Triton on GPUs, which is not installed"
    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return f"inductor needs a C++ compiler on the CPU; none found ({inductor_config.cpp.cxx})"
    return None


def pays(n: int, device) -> bool:
    """Whether compiling is worth its time for n sentences on this device (the auto setting)."""
    return device.type == "cpu" and n >= BREAK_EVEN


def cache_dir() -> str:
    """Where inductor keeps compiled code between runs: $TORCHINDUCTOR_CACHE_DIR, else
    <sentemb cache>/compile (set here, before inductor first reads it)."""
    default = str(cache_root() / "compile")
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default)


# Inductor's settings for the decoder. emulate_precision_casts: round to bf16/fp16 where the eager
# forward rounds, not only at a fused kernel's end, so compiled vectors equal eager ones (cosine
# >= 0.9999 rather than 0.999). realize_cpu_opcount_threshold: inductor inlines a reused value
# into each consumer's kernel unless it is costly by its measures (exp, log, sigmoid or tanh in it,
# or over 50 operations), so the cos and sin of RoPE's angles would be computed again in every
# layer's kernel, a sixth of the compiled forward; at 20 they are computed once per batch.
OPTIONS = {"emulate_precision_casts": True, "realize_cpu_opcount_threshold": 20}


def compiled(model):
    """The decoder's forward through torch.compile: dynamic shapes, one graph (see above)."""
    import torch
    cache_dir()
    return torch.compile(model, dynamic=True, options=OPTIONS)


# Set while the graph is traced and built on the CPU (dynamo reads `freezing` from the global
# config, not from torch.compile's options): weights as constants; matrix products timed between
# oneDNN and inductor's C++ templates, the timings kept off the user's terminal.
FROZEN = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
          "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


def warm_up(forward, tok, batch_size: int, device) -> float:
    """Build the graph: `forward(prompts)` on a dummy batch the size of a run's (a sentence's
    tokens after the prompt's head, one prompt padded), so that the products are timed at the
    sizes they will run at; -> the seconds it took."""
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config
    rows = max(batch_size, 2)
    prompts = [[tok.pad_id] * 20] * (rows - 1) + [[tok.pad_id] * 19]
    frozen = FROZEN if device.type == "cpu" else {}
    t0 = time.perf_counter()
    # No duck sizing: dimensions of equal size at trace time would share a symbol, and a later
    # batch where they differ would build a second graph.
    with fx_config.patch(use_duck_shape=False), inductor_config.patch(frozen), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TypedStorage is deprecated")   # (inductor's own call)
        forward(prompts)
    return time.perf_counter() - t0
