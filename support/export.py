"""Used by lora (python lora.py merge): an adapter merged into its base, as a Hugging Face folder.

    python lora.py merge --model opt-1.3b --adapter runs/cse/best --output opt-1.3b-cse

writes safetensors weights under Hugging Face names, config.json, a tokenizer that pads on the left
and prepends BOS as sentemb does, README.md (base, adapter, template, pooling, demonstration, and a
transformers snippet that reproduces the embeddings) and sentemb_export.json. A base trained in 4 or
8 bits (--bits) is dequantized and the adapter merged into that float copy (--dtype). The folder is
written beside DIR and renamed at the end: a failed run leaves nothing. The stage passes its loaders
(model.load, lora.load_adapter, lora.merge_lora): support never imports a stage.
"""
import argparse
import hashlib
import json
import shutil
from pathlib import Path

from support.cli import DTYPES, UserError, device, parse_demonstrations
from support.files import atomic
from support.hub import hub_id, hub_snapshot, resolve
from support.provenance import git_commit
from support import tokenizer

# As embed.py renders prompts (tests/test_support_export.py checks that they agree).
TEMPLATES = {"eol": 'This sentence : "{sentence}" means in one word:"',
             "prompt": 'This sentence : "{sentence}" means', "none": "{sentence}"}
DEMO_FORMAT = 'This sentence : "{sentence}" means in one word:"{word}".'
TOKENIZER_FILES = ("special_tokens_map.json", "generation_config.json")   # copied when present
SHARD_BYTES = 5 * 2**30


def check_output(path) -> Path:
    out = Path(path).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output {path}: exists and is not an empty folder; nothing was written "
                        f"(choose a new folder)")
    if not out.parent.is_dir():
        raise UserError(f"--output {path}: its folder {out.parent} does not exist")
    return out


def adapter_files(adapter) -> tuple[Path, dict]:
    """(the adapter's folder, its adapter_config.json) of a local folder or a hub id; one line if
    unreadable."""
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        folder = hub_snapshot(str(adapter), ["adapter_config.json", "adapter_model.*"], "adapter")
    try:
        return folder, json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{adapter} is not a PEFT adapter: adapter_config.json: "
                        f"{getattr(e, 'strerror', None) or e}") from None


def dequantize_all(model, dtype):
    """Each bitsandbytes Linear4bit / Linear8bitLt -> a float nn.Linear, its weight dequantized."""
    from torch import nn
    for name, mod in list(model.named_modules()):
        weight = getattr(mod, "weight", None)
        if not isinstance(mod, nn.Linear) or weight is None or weight.is_floating_point():
            continue
        from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant
        if hasattr(weight, "quant_state"):   # Linear4bit (NF4)
            w = dequantize_4bit(weight.data, weight.quant_state)
        else:                                # Linear8bitLt: the row scales move to .state when used
            scales = mod.state.SCB if weight.SCB is None else weight.SCB
            w = int8_vectorwise_dequant(weight.data, scales)
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        if mod.bias is not None:
            lin.bias = nn.Parameter(mod.bias.detach().to(dtype), requires_grad=False)
        model.set_submodule(name, lin)
    return model


def save_weights(model, folder: Path, tied: bool, shard_bytes=SHARD_BYTES):
    """model.safetensors (or shards and their index, as save_pretrained names them); a tied LM head
    is the embedding matrix, saved once as transformers does."""
    from safetensors.torch import save_file
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if tied:
        sd.pop("lm_head.weight", None)
    shards = [[]]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    if len(shards) == 1:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: sd[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_tokenizer(tok, base: Path, folder: Path, max_positions: int):
    """tokenizer.json (the tokenizer sentemb used, its post-processor prepending BOS exactly when
    sentemb does) and a tokenizer_config.json that pads on the left, for AutoTokenizer."""
    from tokenizers import Tokenizer, processors
    t = Tokenizer.from_str(tok.tok.to_str())
    specials = []
    single = "$A"
    if tok.bos_id is not None:
        bos = t.id_to_token(tok.bos_id)
        specials = [(bos, tok.bos_id)]
        single = f"{bos} $A"
    t.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    for probe in ("A man plays a guitar.", 'x "y" ?'):
        if t.encode(probe).ids != tok.encode(probe):
            raise RuntimeError(f"the exported tokenizer encodes {probe!r} unlike sentemb's")
    t.save(str(folder / "tokenizer.json"))
    old = base / "tokenizer_config.json"
    cfg = json.loads(old.read_text()) if old.exists() else {}
    names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
    for key, i in names.items():
        if cfg.get(key) is None and i is not None and t.id_to_token(i) is not None:
            cfg[key] = t.id_to_token(i)
    cfg.pop("tokenizer_file", None)
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", padding_side="left",
               add_bos_token=tok.bos_id is not None, add_eos_token=False,
               model_input_names=["input_ids", "attention_mask"],
               model_max_length=cfg.get("model_max_length", max_positions))
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (base / name).exists():
            shutil.copy2(base / name, folder / name)


def save_config(base: Path, folder: Path, dtype: str):
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("quantization_config", None)   # the weights are plain floats now
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
    cfg.update(dict.fromkeys(keys, dtype))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def snippet(path: Path, template: str, demo_text: str) -> str:
    """Python that reproduces the embeddings with transformers (tests run it)."""
    clean = [
        "    s = sentence.strip().replace('\"', \"'\")   # sentemb's clean-up (embed.preprocess)",
        "    if s and s[-1] not in \".?'\":",
        "        s += \".\"",
        "    if s.endswith(\"?\"):",
        "        s = s[:-1] + \".\"",
    ] if template != "none" else ["    s = sentence"]
    return "\n".join([
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"path = {str(path)!r}",
        "tokenizer = AutoTokenizer.from_pretrained(path)   # pads on the left",
        "model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()",
        f"DEMONSTRATION = {demo_text!r}",
        f"TEMPLATE = {TEMPLATES[template]!r}",
        "",
        "",
        "def prompt(sentence):",
        *clean,
        "    return DEMONSTRATION + TEMPLATE.replace(\"{sentence}\", s)",
        "",
        "",
        "@torch.no_grad()",
        "def embed(sentences):",
        "    prompts = [prompt(s) for s in sentences]",
        "    batch = tokenizer(prompts, padding=True, return_tensors=\"pt\")",
        "    positions = (batch[\"attention_mask\"].cumsum(-1) - 1).clamp(min=0)   # real tokens",
        "    out = model(**batch, position_ids=positions, output_hidden_states=True)",
        "    return out.hidden_states[-1][:, -1]   # (n, hidden): the last token's final state",
        "",
        "",
        "e = embed([\"A man plays a guitar.\", \"Someone is playing music.\"])",
        "print(torch.nn.functional.cosine_similarity(e[0], e[1], dim=0))",
    ])


def readme(record: dict, path: Path) -> str:
    demo = record["demonstrations"]
    demo_line = "none" if not demo else "; ".join(f"`{s}` => `{w}`" for s, w in demo)
    flags = "".join(f' --demonstration "{s}=>{w}"' for s, w in demo)
    quant = (f" The adapter was trained on a {record['bits']}-bit base: it is merged into the "
             f"dequantized weights it was trained with." if record["bits"] else "")
    bos = "BOS prepended" if record["bos_prepended"] else "no BOS"
    hub = f" (`{record['base_hub_id']}`)" if record["base_hub_id"] != record["base"] else ""
    return "\n".join([
        f"# {path.name}: a PromptEOL sentence embedder merged by sentemb", "",
        f"- Base model: `{record['base']}`{hub}",
        f"- LoRA adapter: `{record['adapter']}` (sha256 {record['adapter_sha256']}), merged "
        f"into the weights: W = W0 + (alpha / r) B A.{quant}",
        f"- Weights: {record['dtype']}, safetensors, Hugging Face names; config.json and tokenizer "
        f"as transformers reads them.",
        f"- Template: `{TEMPLATES[record['template']]}` with the sentence at `{{sentence}}`.",
        "- Pooling: the last token's final hidden state (after the final norm), left padding, "
        f"{bos}; compare embeddings by cosine.",
        f"- Demonstration: {demo_line}.", "",
        "## With transformers", "", "```python", snippet(path, record["template"],
                                                        record["demo_text"]), "```", "",
        "## With sentemb", "",
        f"    python embed.py --model {path}{flags} \"A man plays a guitar.\" \"Someone plays.\"",
        "",
        f"`Embedder(model=\"{path}\")` gives the vectors of the base with the adapter.", "",
    ])


def merge(model, adapter, output, *, load, load_adapter, merge_lora, dtype=None, bits=None,
          demonstrations=(), template="eol", where="cpu", shard_bytes=SHARD_BYTES) -> Path:
    """Base `model` + LoRA `adapter` -> a Hugging Face folder at `output` (module docstring)."""
    import torch
    out = check_output(output)
    if template not in TEMPLATES:
        raise UserError(f"unknown template {template!r}: choose from {', '.join(TEMPLATES)}")
    if demonstrations and template != "eol":
        raise UserError(f"demonstrations need the 'eol' template, not {template!r}")
    folder, acfg = adapter_files(adapter)
    model = model or acfg.get("base_model_name_or_path")
    if not model:
        raise UserError(f"{adapter} names no base model: pass --model")
    base = resolve(model)
    cfg = json.loads((base / "config.json").read_text())
    dtype = dtype or next((cfg[k] for k in ("dtype", "torch_dtype") if cfg.get(k) in DTYPES),
                          "float32")
    m = load(base, dtype=getattr(torch, dtype), device=where, bits=bits)
    tok = tokenizer.load(base, m.config)
    if bits:
        dequantize_all(m, getattr(torch, dtype))
    load_adapter(m, adapter)
    tied = bool(m.config.tie_word_embeddings)
    adapted = [n for n, mod in m.named_modules() if hasattr(mod, "lora_A")]
    if tied and "lm_head" in adapted:
        raise UserError(f"adapter {adapter} changes the LM head, which this model ties to its "
                        f"embeddings: merging would change the embeddings too")
    merge_lora(m)
    weights = sorted(folder.glob("adapter_model.*"))
    sha = hashlib.sha256(b"".join(f.read_bytes() for f in weights)).hexdigest()
    demo_text = "".join(DEMO_FORMAT.format(sentence=s, word=w) for s, w in demonstrations)
    record = {"base": model, "base_hub_id": hub_id(model), "adapter": str(adapter),
              "adapter_sha256": sha, "dtype": dtype, "bits": bits, "template": template,
              "pooling": "last", "padding": "left", "bos_prepended": tok.bos_id is not None,
              "demonstrations": [list(d) for d in demonstrations], "demo_text": demo_text,
              "sentemb_commit": git_commit()}
    with atomic(out) as tmp:
        tmp.mkdir()
        save_weights(m, tmp, tied, shard_bytes)
        save_config(base, tmp, dtype)
        save_tokenizer(tok, base, tmp, m.config.max_position_embeddings)
        for f in tmp.glob("*.safetensors"):   # safetensors writes 0600: as the other files
            shutil.copymode(tmp / "config.json", f)
        final = out.resolve()
        (tmp / "README.md").write_text(readme(record, final))
        (tmp / "sentemb_export.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def parser():
    p = argparse.ArgumentParser(prog="lora.py", description="LoRA adapters (PEFT format).")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge an adapter into its base: a Hugging Face model folder")
    m.add_argument("--model", help="the base: alias, local folder or hub id (default: the "
                                   "adapter's base_model_name_or_path)")
    m.add_argument("--adapter", required=True, help="LoRA adapter (PEFT format): folder or hub id")
    m.add_argument("--output", required=True, metavar="DIR", help="new folder (absent or empty)")
    m.add_argument("--dtype", choices=DTYPES,
                   help="precision of the merged weights (default: the base's config.json, else "
                        "float32)")
    m.add_argument("--bits", type=int, choices=[4, 8],
                   help="the adapter was trained on a 4- or 8-bit base (train_cse.py's default is "
                        "4): merge into those dequantized weights")
    m.add_argument("--template", choices=list(TEMPLATES), default="eol",
                   help="the prompt the README documents (default: eol, PromptEOL)")
    m.add_argument("--demonstration", action="append", metavar="SENTENCE=>WORD",
                   help="the demonstration the README documents (default: none, as sentemb "
                        "uses an adapter)")
    m.add_argument("--device", default="cpu", help="where to merge (default: cpu)")
    return p


def main(argv=None, *, load, load_adapter, merge_lora) -> int:
    args = parser().parse_args(argv)
    out = merge(args.model, args.adapter, args.output, load=load, load_adapter=load_adapter,
                merge_lora=merge_lora, dtype=args.dtype, bits=args.bits, template=args.template,
                demonstrations=parse_demonstrations(args.demonstration) or [],
                where=device(args.device))
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)}")
    return 0
