"""Sentence embeddings from a decoder LLM with PromptEOL (Jiang et al. 2023): the final hidden state of the last
token of `This sentence : "<sentence>" means in one word:"`, the state from which the model would predict that
word. A demonstration in front (`This sentence : "A jockey riding a horse." means in one word:"Equestrian".`,
in-context learning) raises STS scores without any training. `prompteol` below is the whole method; `Embedder`
computes the same vectors faster: the shared prefix (demonstrations + `This sentence :`) runs once and its
key/value cache serves every sentence, and sentences sorted by length fill batches with little padding.

    python embed.py "A man plays a guitar." "Someone is playing music." "A woman slices an onion."
    python embed.py --input sentences.txt --output emb.npy
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

from support.cli import UserError, cli, device, embedder_flags, parse_demonstrations, writable
import torch  # after support.cli: it sets OpenMP's waiting policy before torch loads
from tqdm import tqdm

import model as M
from support import corpus, hub
from support.cache import fingerprint
from support.files import atomic

# The sentence goes where {sentence} is; the template and the pooling are separate choices.
TEMPLATES = {
    "eol": 'This sentence : "{sentence}" means in one word:"',   # PromptEOL
    "prompt": 'This sentence : "{sentence}" means',              # PromptBERT-style, no "in one word"
    "none": "{sentence}",                                        # the bare sentence
}
POOLINGS = ("last", "mean")   # the last token's state (left padding), or the mean over the prompt's tokens but BOS
DEMO_FORMAT = 'This sentence : "{sentence}" means in one word:"{word}".'
DEFAULTS_FILE = Path(__file__).resolve().parent / "data" / "demonstrations.json"


def preprocess(s: str) -> str:
    """The reference code's clean-up before templating (kongds/scaling_sentemb evaluation): end with punctuation,
    no double quotes inside the quoted slot, a final ? becomes . (Outer whitespace goes first; benchmarks have none.)"""
    s = s.strip().replace('"', "'")      # first: a final " is now ', which the reference also counts as an ending
    if s and s[-1] not in ".?'":
        s += "."
    if s and s[-1] == "?":
        s = s[:-1] + "."
    return s


def render(tok, sentence: str, template: str = "eol", demo_text: str = "", max_tokens: int | None = None, clean=True):
    """-> (prompt text, cut?). max_tokens cuts the sentence before templating, never the template's end (evaluation:
    no cut, as in the paper); clean: `preprocess` it, as the reference's evaluation does (its training does not)."""
    ids = tok.encode(sentence, bos=False) if max_tokens else []
    cut = len(ids) > (max_tokens or 0)
    if cut:
        sentence = tok.decode(ids[:max_tokens])
    if template != "none" and clean:
        sentence = preprocess(sentence)
    return demo_text + TEMPLATES[template].replace("{sentence}", sentence), cut


@torch.inference_mode()
def prompteol(model, tok, sentences, demonstrations=(), max_tokens=None) -> torch.Tensor:
    """PromptEOL, the whole method in one batch: (n, H) final-norm hidden states of each prompt's last token.
    The reference that Embedder.encode equals; it adds a prefix cache, length sorting and batching."""
    demo_text = "".join(DEMO_FORMAT.format(sentence=s, word=w) for s, w in demonstrations)
    prompts = [render(tok, s, "eol", demo_text, max_tokens)[0] for s in sentences]
    ids, mask = tok.pad([tok.encode(p) for p in prompts], device=model.embeddings().weight.device)  # left padding
    return model(ids, mask)[:, -1]                                   # (B, T, H) -> (B, H): the last token


def default_demonstrations(model_name: str) -> list[tuple[str, str]]:
    """The demonstration each alias (or its hub id) uses unless told otherwise (data/demonstrations.json)."""
    table = json.loads(DEFAULTS_FILE.read_text()) if DEFAULTS_FILE.exists() else {}
    d = table.get(model_name) or table.get(next((k for k, v in hub.ALIASES.items() if v == model_name), None))
    return [(d["sentence"], d["word"])] if d else []


class Embedder:
    """embedder.encode(sentences) -> float32 array (n, hidden), in input order."""

    def __init__(self, model: str = hub.DEFAULT_MODEL, template: str = "eol", pooling: str = "last",
                 demonstrations="default", max_tokens: int | None = None, batch_size: int = 64, device=None,
                 dtype=None, bits=None, adapter: str | None = None):
        if template not in TEMPLATES or pooling not in POOLINGS:
            raise UserError(f"unknown template {template!r} or pooling {pooling!r}: choose a template from "
                            f"{', '.join(TEMPLATES)} and a pooling from {', '.join(POOLINGS)}")
        if demonstrations is None or demonstrations == "default":  # an adapter is used without ICL, as in the paper
            paper = template == "eol" and pooling == "last" and not adapter
            demonstrations = default_demonstrations(model) if paper else []
        if (max_tokens is not None and max_tokens < 1) or batch_size < 1:
            raise UserError("max_tokens and batch_size must be positive")
        self.template, self.pooling, self.max_tokens, self.batch_size = template, pooling, max_tokens, batch_size
        self.model, self.tok = M.load(hub.resolve(model), dtype=dtype, device=device, bits=bits)
        if adapter:
            import lora
            lora.load_adapter(self.model, adapter)
            self.model.eval()
        self.device, self.dtype = self.model.embeddings().weight.device, self.model.embeddings().weight.dtype
        self.stats = {"sentences": 0, "tokens": 0, "truncated": 0, "seconds": 0.0}
        self.fingerprint = fingerprint(self.model.source, adapter, model=model, bits=bits, dtype=str(self.dtype),
                                       template=TEMPLATES[template], pooling=pooling, max_tokens=max_tokens)
        self._set_demonstrations(demonstrations)

    def _set_demonstrations(self, demos):
        pairs = isinstance(demos, (list, tuple)) and all(
            isinstance(d, (list, tuple)) and len(d) == 2 and all(isinstance(x, str) for x in d) for d in demos)
        if not pairs:
            raise UserError(f"demonstrations must be a list of (sentence, word) pairs of strings, not {demos!r:.80}")
        if demos and self.template != "eol":
            raise UserError(f"demonstrations need the 'eol' template, not {self.template!r}")
        self.demonstrations = [tuple(d) for d in demos]
        self.fingerprint = dict(self.fingerprint, demonstrations=[list(d) for d in self.demonstrations])
        # The cached prefix stops at the last whitespace before the sentence slot (`...This sentence :`), a
        # boundary no BPE merge crosses in practice; each full prompt is tokenized whole and checked to start
        # with it. Mean pooling averages the whole prompt, so it runs without the cache.
        self.demo_text = "".join(DEMO_FORMAT.format(sentence=s, word=w) for s, w in self.demonstrations)
        head = self.demo_text + TEMPLATES[self.template].split("{sentence}")[0]
        self.prefix_text = head[:head.rfind(" ")] if " " in head and self.pooling == "last" else ""
        self.prefix_ids = self.tok.encode(self.prefix_text) if self.prefix_text else []
        self._past = None

    def with_demonstrations(self, demonstrations) -> "Embedder":
        """A copy sharing the loaded model, with other demonstrations (for the ICL search)."""
        other = copy.copy(self)
        other.stats = dict.fromkeys(self.stats, 0)
        other._set_demonstrations(demonstrations)
        return other

    def prompt(self, sentence: str) -> tuple[str, bool]:
        return render(self.tok, sentence, self.template, self.demo_text, self.max_tokens)

    def tokenize(self, sentences, first=1):
        """-> [(prompt ids after the cached prefix, or all ids if it doesn't match; uses the prefix)].
        Errors name lines counting from `first`."""
        if isinstance(sentences, str):
            raise UserError("encode takes a list of sentences, not one string")
        out, empty, P, limit = [], [], len(self.prefix_ids), self.model.config.max_position_embeddings
        for n, s in enumerate(sentences, first):
            if not isinstance(s, str):
                raise UserError(f"encode takes strings: sentences[{n - first}] is of type {type(s).__name__}")
            text, cut = self.prompt(s)
            self.stats["truncated"] += cut
            ids = self.tok.encode(text)
            if len(ids) > limit:
                raise UserError(f"sentence at line {n} needs {len(ids)} tokens with its prompt, more than the "
                                f"model's {limit} positions: pass --max-tokens N to cut sentences")
            if not (ids if self.pooling == "last" else [t for t in ids if t != self.tok.bos_id]):
                empty.append(str(n))
            hit = P > 0 and ids[:P] == self.prefix_ids and len(ids) > P
            out.append((ids[P:] if hit else ids, hit))
        if empty:
            raise UserError(f"empty sentence at line {', '.join(empty)} (counting from 1): template 'none' and "
                            f"{self.pooling} pooling leave it no token to pool; drop empty lines or choose a template")
        return out

    def batches(self, items):
        """-> [(uses the prefix cache, indices)]: longest first, so the first batch shows the peak memory;
        sentences with and without the cached prefix go in separate batches."""
        out = []
        for hit in (True, False):
            idx = sorted((i for i, (_, h) in enumerate(items) if h == hit), key=lambda i: -len(items[i][0]))
            out += [(hit, idx[j:j + self.batch_size]) for j in range(0, len(idx), self.batch_size)]
        return out

    @torch.inference_mode()
    def encode(self, sentences, normalize: bool = False, progress: bool = False, first: int = 1) -> np.ndarray:
        t0 = time.perf_counter()
        items = self.tokenize(sentences, first)
        out = np.zeros((len(items), self.model.embeddings().embedding_dim), dtype=np.float32)
        if self._past is None and self.prefix_ids:   # the shared prefix runs once; its key/value cache is kept
            _, self._past = self.model(torch.tensor([self.prefix_ids], device=self.device), use_cache=True)
        for hit, idx in tqdm(self.batches(items), "embed", unit="batch", disable=not progress, file=sys.stderr):
            ids, mask = self.tok.pad([items[i][0] for i in idx], device=self.device)   # (B, T), left padding
            h = self.model(ids, mask, past=self._past if hit else None)      # (B, T, H)
            if self.pooling == "last":
                emb = h[:, -1]                                     # (B, H): the last token's state, PromptEOL
            else:  # real tokens only: never padding, nor BOS (an attention sink whose huge state would dominate)
                m = mask if self.tok.bos_id is None else mask * (ids != self.tok.bos_id)        # (B, T)
                emb = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)                         # (B, H)
            out[idx] = emb.float().cpu().numpy()
            self.stats["tokens"] += int(mask.sum()) + len(idx) * len(self.prefix_ids) * hit
        self.stats["sentences"] += len(items)
        self.stats["seconds"] += time.perf_counter() - t0
        if normalize:
            out /= np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-12)
        return out

    def encode_file(self, input_path, output_path, normalize: bool = False, progress: bool = False) -> dict:
        """Each line of a text file (.gz too) -> a row of a .npy, .jsonl or .safetensors file: see corpus.py."""
        return corpus.embed_file(self, input_path, output_path, normalize=normalize, progress=progress)


# ---------------------------------------------------------------------- CLI
def read_stdin() -> list[str]:
    """Sentences piped on stdin, one a line, split as corpus.py splits an --input file: at "\n" only."""
    lines = [line for _, chunk in corpus.read_chunks(Path("/dev/stdin"), corpus.CHUNK) for line in chunk]
    if not lines:
        raise UserError("stdin is empty: nothing to embed")
    return lines


def check_output(path: str | None, quick: bool):
    if path is None:
        if quick:
            return
        raise UserError("no --output: pass --output FILE (.npy, .safetensors or .jsonl) to keep the embeddings")
    if Path(path).suffix not in (".npy", ".safetensors", ".jsonl"):
        raise UserError(f"--output {path}: use a .npy, .safetensors or .jsonl file name")
    writable("--output", path)


def write_output(path: str, sentences, emb: np.ndarray):
    """Written to a temporary file renamed at the end: a failed run leaves no partial file."""
    try:
        with atomic(path) as tmp, open(tmp, "wb") as f:
            if path.endswith(".npy"):
                np.save(f, emb)
            elif path.endswith(".safetensors"):
                from safetensors.numpy import save
                f.write(save({"embeddings": emb}))
            else:
                for s, e in zip(sentences, emb):
                    row = {"sentence": s, "embedding": [round(float(x), 6) for x in e]}
                    f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}; nothing was written") from None


def main(argv=None):
    ap = argparse.ArgumentParser(description="PromptEOL sentence embeddings from a decoder LLM.")
    ap.add_argument("sentences", nargs="*", help="quick mode: embed these and print their cosine similarities")
    ap.add_argument("--model", default=hub.DEFAULT_MODEL,
                    help=f"alias ({', '.join(hub.ALIASES)}), local directory or hub id (default: %(default)s)")
    ap.add_argument("--input", help="file with one sentence per line (default: stdin); empty lines stay rows")
    ap.add_argument("--output", help=".npy, .safetensors or .jsonl file for the embeddings, in input order")
    embedder_flags(ap)
    ap.set_defaults(template="eol", pooling="last")
    ap.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    args = ap.parse_args(argv)
    stream = bool(args.input and args.output and not args.sentences)   # a corpus of any size: corpus.py
    dev = corpus.setup(args) if stream else device(args.device)
    hub.resolve(args.model)  # an unknown model fails now, before reading input or loading weights
    if not (args.sentences or args.input) and sys.stdin.isatty():
        raise UserError("no input: pass sentences as arguments, --input FILE, or pipe them on stdin")
    check_output(args.output, quick=bool(args.sentences))
    emb = Embedder(args.model, template=args.template, pooling=args.pooling, max_tokens=args.max_tokens,
                   demonstrations=parse_demonstrations(args.demonstration), batch_size=args.batch_size,
                   device=dev, dtype=args.dtype, bits=args.bits, adapter=args.adapter)
    if stream:
        return corpus.run(emb, args)
    sentences = args.sentences or read_stdin()
    vecs = emb.encode(sentences, normalize=args.normalize, progress=len(sentences) > 256)
    if args.output:
        write_output(args.output, sentences, vecs)
    if args.sentences:
        u = vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(min=1e-12)
        for s, row in zip(sentences, u @ u.T):
            print(" ".join(f"{x:6.3f}" for x in row), " ", s)
    st, empty = emb.stats, sum(1 for s in sentences if not s.strip())
    print(f"{st['sentences']} sentences, {st['tokens']} tokens, {st['seconds']:.2f} s, "
          f"{st['sentences'] / max(st['seconds'], 1e-9):.1f} sentences/s in {str(emb.dtype).removeprefix('torch.')}"
          + (f", {st['truncated']} truncated to {args.max_tokens} tokens" if st["truncated"] else "")
          + (f", {empty} empty lines kept as rows" if empty else "")
          + (f" -> {args.output}" if args.output else ""), file=sys.stderr)


if __name__ == "__main__":
    kept = "nothing was written (an existing --output file is untouched)"
    sys.exit(cli(main, interrupted=lambda: corpus.kept or kept))
