"""Sentence embeddings from a decoder LLM with PromptEOL (Jiang et al. 2023).

PromptEOL asks the model to squeeze the sentence into one word,
    This sentence : "<sentence>" means in one word:"
and takes the final hidden state of the last token -- the state from which the
model would predict that word. One demonstration in front of the template,
    This sentence : "A jockey riding a horse." means in one word:"Equestrian".
(in-context learning) raises STS scores without any training.

    python embed.py "A man plays a guitar." "Someone is playing music." "A woman slices an onion."
    python embed.py --input sentences.txt --output emb.npy

Speed: the shared prefix (demonstrations + `This sentence :`) runs once and its
key/value cache serves every sentence; sentences are sorted by length so batches
carry little padding; no LM head runs.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import corpus
import model as M
import common
from common import content_id, files_id, parse_demonstrations

# The sentence goes where {sentence} is; the template and the pooling are separate choices.
TEMPLATES = {
    "eol": 'This sentence : "{sentence}" means in one word:"',   # PromptEOL
    "prompt": 'This sentence : "{sentence}" means',              # PromptBERT-style, no "in one word"
    "none": "{sentence}",                                        # the bare sentence
}
POOLINGS = ("last", "mean")   # the last token's state (left padding), or the mean over the sentence's tokens
DEMO_FORMAT = 'This sentence : "{sentence}" means in one word:"{word}".'
DEFAULTS_FILE = Path(__file__).resolve().parent / "data" / "demonstrations.json"


def default_demonstrations(model_name: str) -> list[tuple[str, str]]:
    """The demonstration each alias uses unless told otherwise (data/demonstrations.json)."""
    table = json.loads(DEFAULTS_FILE.read_text()) if DEFAULTS_FILE.exists() else {}
    d = table.get(model_name)
    return [(d["sentence"], d["word"])] if d else []


def preprocess(s: str) -> str:
    """The reference code's clean-up before templating (kongds/scaling_sentemb evaluation):
    end with punctuation, no double quotes inside the quoted slot, a final ? becomes ."""
    if s and s[-1] not in '.?"\'':
        s += "."
    s = s.replace('"', "'")
    if s and s[-1] == "?":
        s = s[:-1] + "."
    return s


def render(tok, sentence: str, template: str = "eol", demo_text: str = "", max_tokens: int | None = None):
    """-> (prompt text, was the sentence cut?). With max_tokens the sentence is cut before templating, so the
    template's end is never cut; evaluation keeps the whole sentence, as the paper does."""
    ids = tok.encode(sentence, bos=False) if max_tokens else []
    cut = len(ids) > (max_tokens or 0)
    if cut:
        sentence = tok.decode(ids[:max_tokens])
    if template != "none":
        sentence = preprocess(sentence)
    return demo_text + TEMPLATES[template].replace("{sentence}", sentence), cut


@torch.inference_mode()
def prompteol(model, tok, sentences, demonstrations=(), max_tokens=None) -> torch.Tensor:
    """PromptEOL, the whole method in one batch: (n, H) final-norm hidden states of each prompt's last token.
    The reference that Embedder.encode must equal; it adds a prefix cache, length sorting and batching."""
    demo_text = "".join(DEMO_FORMAT.format(sentence=s, word=w) for s, w in demonstrations)
    prompts = [render(tok, s, "eol", demo_text, max_tokens)[0] for s in sentences]
    ids, mask = tok.pad([tok.encode(p) for p in prompts], device=model.embeddings().weight.device)  # left padding
    return model(ids, mask)[:, -1]                                   # (B, T, H) -> (B, H): the last token


class Embedder:
    """embedder.encode(sentences) -> float32 array (n, hidden), in input order."""

    def __init__(self, model: str = M.DEFAULT_MODEL, template: str = "eol", pooling: str = "last",
                 demonstrations="default", max_tokens: int | None = None, batch_size: int = 64, device=None,
                 dtype=None, bits=None, adapter: str | None = None):
        if template not in TEMPLATES or pooling not in POOLINGS:
            raise ValueError(f"unknown template {template!r} or pooling {pooling!r}: choose a template from "
                             f"{', '.join(TEMPLATES)} and a pooling from {', '.join(POOLINGS)}")
        if demonstrations == "default":  # a fine-tuned (adapter) model is used without ICL, as in the paper
            paper = template == "eol" and pooling == "last" and not adapter
            demonstrations = default_demonstrations(model) if paper else []
        demonstrations = demonstrations or []
        if demonstrations and template != "eol":
            raise ValueError(f"demonstrations need the 'eol' template, not {template!r}")
        if (max_tokens is not None and max_tokens < 1) or batch_size < 1:
            raise ValueError("max_tokens and batch_size must be positive")
        self.model, self.tok = M.load(model, dtype=dtype, device=device, bits=bits)
        if adapter:
            import lora
            lora.load_adapter(self.model, adapter)
            self.model.eval()
        self.device = self.model.embeddings().weight.device
        self.template, self.pooling, self.max_tokens, self.batch_size = template, pooling, max_tokens, batch_size
        self.max_positions = self.model.config.max_position_embeddings
        self.stats = {"sentences": 0, "tokens": 0, "truncated": 0, "seconds": 0.0}
        self.fingerprint = {
            "model": model, "weights": files_id(self.model.source), "adapter": adapter,
            "adapter_sha256": content_id(adapter), "bits": bits, "dtype": str(self.model.embeddings().weight.dtype),
            "template": TEMPLATES[template], "pooling": pooling, "max_tokens": max_tokens, "version": 2}
        self._set_demonstrations(demonstrations)

    def _set_demonstrations(self, demonstrations):
        self.demonstrations = [tuple(d) for d in demonstrations]
        self.fingerprint = dict(self.fingerprint, demonstrations=[list(d) for d in self.demonstrations])
        # The cached prefix stops at the last whitespace before the sentence slot
        # (`...This sentence :`), a boundary no BPE merge crosses in practice; each
        # sentence's full prompt is tokenized whole and checked to start with it.
        self.demo_text = "".join(DEMO_FORMAT.format(sentence=s, word=w) for s, w in self.demonstrations)
        head = self.demo_text + TEMPLATES[self.template].split("{sentence}")[0]
        self.prefix_text = head[:head.rfind(" ")] if " " in head else ""
        self.prefix_ids = self.tok.encode(self.prefix_text) if self.prefix_text else []
        self._past = None

    def with_demonstrations(self, demonstrations) -> "Embedder":
        """A copy sharing the loaded model, with other demonstrations (for the ICL search)."""
        if demonstrations and self.template != "eol":
            raise ValueError(f"demonstrations need the 'eol' template, not {self.template!r}")
        other = copy.copy(self)
        other.stats = dict.fromkeys(self.stats, 0)
        other._set_demonstrations(demonstrations)
        return other

    # ------------------------------------------------------------------ prompts
    def prompt(self, sentence: str) -> tuple[str, bool]:
        return render(self.tok, sentence, self.template, self.demo_text, self.max_tokens)

    def tokenize(self, sentences):
        """-> list of (prompt ids after the cached prefix, or full ids if it doesn't match, uses_prefix)."""
        out, P = [], len(self.prefix_ids)
        for s in sentences:
            text, cut = self.prompt(s)
            self.stats["truncated"] += cut
            ids = self.tok.encode(text)
            if len(ids) > self.max_positions:
                raise ValueError(f"sentence {len(out)} needs {len(ids)} tokens with its prompt, more than the "
                                 f"model's {self.max_positions} positions: pass --max-tokens N to cut sentences")
            hit = P > 0 and ids[:P] == self.prefix_ids and len(ids) > P
            out.append((ids[P:] if hit else ids, hit))
        return out

    @torch.inference_mode()
    def prefix_cache(self):
        if self._past is None and self.prefix_ids:
            ids = torch.tensor([self.prefix_ids], device=self.device)
            _, self._past = self.model(ids, use_cache=True)
        return self._past

    # ------------------------------------------------------------------ encode
    @torch.inference_mode()
    def encode(self, sentences, normalize: bool = False, progress: bool = False) -> np.ndarray:
        if isinstance(sentences, str):
            raise ValueError("encode takes a list of sentences, not one string")
        t0 = time.perf_counter()
        items = self.tokenize(list(sentences))
        H = self.model.embeddings().embedding_dim
        out = np.zeros((len(items), H), dtype=np.float32)
        # Longest first, so the first batch shows the peak memory; each group (with or
        # without the cached prefix) is batched separately.
        order = sorted(range(len(items)), key=lambda i: (not items[i][1], -len(items[i][0])))
        batches = []
        for hit in (True, False):
            idx = [i for i in order if items[i][1] == hit]
            batches += [(hit, idx[j:j + self.batch_size]) for j in range(0, len(idx), self.batch_size)]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(items), desc="embed", unit="sent", file=sys.stderr)
        for hit, idx in batches:
            ids, mask = self.tok.pad([items[i][0] for i in idx], device=self.device)
            h = self.model(ids, mask, past=self.prefix_cache() if hit else None)       # (B, T, H)
            if self.pooling == "mean":
                # Mean over the sentence's real tokens only: padding never counts, nor
                # does BOS (an attention-sink token whose huge state would dominate).
                m = mask if self.tok.bos_id is None else mask * (ids != self.tok.bos_id)
                emb = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
            else:
                emb = h[:, -1]                                                      # last token (left padding)
            out[idx] = emb.float().cpu().numpy()
            self.stats["tokens"] += int(mask.sum()) + len(idx) * (len(self.prefix_ids) if hit else 0)
            if bar:
                bar.update(len(idx))
        if bar:
            bar.close()
        self.stats["sentences"] += len(items)
        self.stats["seconds"] += time.perf_counter() - t0
        if normalize:
            out /= np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-12)
        return out

    def encode_file(self, input_path, output_path, normalize: bool = False, progress: bool = False) -> dict:
        """Each line of a text file (.gz too) -> a row of a .npy, .jsonl or .safetensors file: see corpus.py."""
        return corpus.embed_file(self, input_path, output_path, normalize=normalize, progress=progress)


# ---------------------------------------------------------------------- CLI
def read_lines(path: str | None) -> list[str]:
    if path is None:
        if sys.stdin.isatty():
            raise ValueError("no input: pass sentences as arguments, --input FILE, or pipe them on stdin")
        data, name = sys.stdin.buffer.read(), "stdin"
    else:
        try:
            data, name = Path(path).read_bytes(), path
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                         f"convert it first, e.g. iconv -f latin1 -t utf-8") from None
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{name} is empty: nothing to embed")
    return lines


def check_output(path: str | None):
    if path is None:
        return
    p = Path(path)
    if p.suffix not in (".npy", ".safetensors", ".jsonl"):
        raise ValueError(f"--output {path}: use a .npy, .safetensors or .jsonl file name")
    if p.is_dir() or not p.parent.exists():
        raise ValueError(f"--output {path}: {'is a directory' if p.is_dir() else 'its folder does not exist'}")
    try:  # fail now, not after the embedding work
        with open(p, "ab"):
            pass
    except OSError as e:
        raise ValueError(f"--output {path} is not writable: {e.strerror}") from None


def write_output(path: str, sentences, emb: np.ndarray):
    p = Path(path)
    if p.suffix == ".npy":
        np.save(p, emb)
    elif p.suffix == ".safetensors":
        from safetensors.numpy import save_file
        save_file({"embeddings": emb}, str(p))
    else:
        with open(p, "w", encoding="utf-8") as f:
            for s, e in zip(sentences, emb):
                f.write(json.dumps({"sentence": s, "embedding": [round(float(x), 6) for x in e]}) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description="PromptEOL sentence embeddings from a decoder LLM.")
    ap.add_argument("sentences", nargs="*", help="quick mode: embed these and print their cosine similarities")
    ap.add_argument("--model", default=M.DEFAULT_MODEL,
                    help=f"alias ({', '.join(M.ALIASES)}), local directory or hub id (default: {M.DEFAULT_MODEL}, offline)")
    ap.add_argument("--input", help="file with one sentence per line (default: stdin); empty lines are kept as rows")
    ap.add_argument("--output", help="write embeddings to .npy, .safetensors or .jsonl (rows in input order)")
    ap.add_argument("--template", default="eol", choices=list(TEMPLATES), help="eol = PromptEOL (paper); prompt = "
                    "without 'in one word'; none = the bare sentence (default: eol)")
    ap.add_argument("--pooling", default="last", choices=POOLINGS,
                    help="last = the last token's state (paper); mean = mean over the sentence's tokens")
    ap.add_argument("--demonstration", action="append", metavar="SENTENCE=>WORD",
                    help="in-context demonstration (repeatable), or 'none'; default: the model's own "
                         "from data/demonstrations.json (none with --adapter)")
    ap.add_argument("--max-tokens", type=int, help="cut each sentence to this many tokens before templating "
                    "(default: no cut, as in the paper's evaluation)")
    ap.add_argument("--batch-size", type=int, default=64, help="sentences per forward pass (default 64)")
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--bits", type=int, choices=[4, 8], help="quantize the decoder blocks' linears (bitsandbytes)")
    ap.add_argument("--adapter", help="LoRA adapter (PEFT format): local directory or hub id")
    ap.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    args = ap.parse_args(argv)
    stream = bool(args.input and args.output and not args.sentences)   # a corpus of any size: corpus.py
    try:
        demos = parse_demonstrations(args.demonstration)
        demos = "default" if demos is None else demos
        M.resolve(args.model)  # an unknown model fails now, before reading input or loading weights
        sentences = args.sentences or ([] if stream else read_lines(args.input))
        check_output(args.output)
        device = corpus.setup(args) if stream else args.device
        emb = Embedder(args.model, args.template, args.pooling, demos, args.max_tokens, args.batch_size,
                       device, args.dtype, args.bits, args.adapter)
        if stream:
            return corpus.run(emb, args)
        vecs = emb.encode(sentences, normalize=args.normalize, progress=len(sentences) > 256)
        if args.output:
            write_output(args.output, sentences, vecs)
        if args.sentences:
            u = vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(min=1e-12)
            sim = u @ u.T
            for i, s in enumerate(sentences):
                print(" ".join(f"{x:6.3f}" for x in sim[i]), " ", s)
        st = emb.stats
        empty = sum(1 for s in sentences if not s.strip())
        print(f"{st['sentences']} sentences, {st['tokens']} tokens, {st['seconds']:.2f} s, "
              f"{st['sentences'] / max(st['seconds'], 1e-9):.1f} sentences/s"
              + (f", {st['truncated']} truncated to {args.max_tokens} tokens" if st["truncated"] else "")
              + (f", {empty} empty lines kept as rows" if empty else "")
              + (f" -> {args.output}" if args.output else ""), file=sys.stderr)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(common.cli(main, interrupted=lambda: corpus.kept or "nothing was written"))
