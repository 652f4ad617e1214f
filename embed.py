"""Sentence embeddings from a decoder LLM with PromptEOL (Jiang et al. 2023): the final hidden state
of the last token of `This sentence : "<sentence>" means in one word:"`, the state from which the
model would predict that word. A demonstration in front (`This sentence : "A jockey riding a
horse." means in one word:"Equestrian".`, in-context learning) raises STS scores without any
training. `prompteol` below is the whole method; `Embedder.encode` computes the same vectors with
the same `last_token`, faster: the shared prefix (demonstrations + `This sentence :`) runs once and
its key/value cache serves every sentence, and sentences sorted by length fill batches with little
padding.

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

from support.cli import (UserError, cli, default_dtype, device, embedder_flags,
                         parse_demonstrations, positive, writable)
import torch  # after support.cli: it sets OpenMP's waiting policy before torch loads
from tqdm import tqdm

import model as M
from support import compile as jit
from support import corpus, hub, tokenizer
from support.cache import fingerprint
from support.files import atomic

# The sentence goes where {sentence} is; the template and the pooling are separate choices.
TEMPLATES = {
    "eol": 'This sentence : "{sentence}" means in one word:"',   # PromptEOL
    "prompt": 'This sentence : "{sentence}" means',   # PromptBERT-style, no "in one word"
    "none": "{sentence}",                             # the bare sentence
}
# The last token's state (left padding), or the mean over the prompt's tokens but BOS.
POOLINGS = ("last", "mean")
DEMO_FORMAT = 'This sentence : "{sentence}" means in one word:"{word}".'
DEFAULTS_FILE = Path(__file__).resolve().parent / "data" / "demonstrations.json"


def preprocess(s: str) -> str:
    """The reference code's clean-up before templating (kongds/scaling_sentemb evaluation): end with
    punctuation, no double quotes inside the quoted slot, a final ? becomes . (Outer whitespace goes
    first; benchmarks have none.)"""
    # First: a final " is now ', which the reference also counts as an ending.
    s = s.strip().replace('"', "'")
    if s and s[-1] not in ".?'":
        s += "."
    if s and s[-1] == "?":
        s = s[:-1] + "."
    return s


def render(tok, sentence: str, template: str = "eol", demo_text: str = "",
           max_tokens: int | None = None, clean=True):
    """-> (prompt text, cut?). max_tokens cuts the sentence before templating, never the template's
    end (evaluation: no cut, as in the paper); clean: `preprocess` it, as the reference's evaluation
    does (its training does not)."""
    ids = tok.encode(sentence, bos=False) if max_tokens else []
    cut = len(ids) > (max_tokens or 0)
    if cut:
        sentence = tok.decode(ids[:max_tokens])
    if template != "none" and clean:
        sentence = preprocess(sentence)
    return demo_text + TEMPLATES[template].replace("{sentence}", sentence), cut


@torch.inference_mode()
def prompteol(model, tok, sentences, demonstrations=(), max_tokens=None) -> torch.Tensor:
    """PromptEOL, the whole method in one batch: (n, H) final-norm hidden states of each prompt's
    last token. Embedder.encode equals it: the same prompts through the same `last_token`, in
    batches that continue a cached prefix."""
    demo_text = "".join(DEMO_FORMAT.format(sentence=s, word=w) for s, w in demonstrations)
    prompts = [render(tok, s, "eol", demo_text, max_tokens)[0] for s in sentences]
    return last_token(model, tok, [tok.encode(p) for p in prompts])


def last_token(model, tok, prompts: list[list[int]], past=None) -> torch.Tensor:
    """(n, H): the final hidden state of each prompt's last token, where the model predicts the next
    word. Left padding puts every last token at -1; `past` is a shared prefix's key/value cache."""
    ids, mask = tok.pad(prompts, device=model.embeddings().weight.device)   # (B, T), left padding
    return model(ids, mask, past=past)[:, -1]                               # (B, T, H) -> (B, H)


def mean_state(model, tok, prompts: list[list[int]]) -> torch.Tensor:
    """(n, H): the mean final hidden state over each prompt's real tokens: never padding, nor BOS
    (an attention sink whose huge state would dominate)."""
    ids, mask = tok.pad(prompts, device=model.embeddings().weight.device)   # (B, T), left padding
    h = model(ids, mask)                                                    # (B, T, H)
    if tok.bos_id is not None:
        mask = mask * (ids != tok.bos_id)                                   # (B, T)
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)         # (B, H)


def default_demonstrations(model_name: str) -> list[tuple[str, str]]:
    """The demonstration each alias (or its hub id) uses unless told otherwise
    (data/demonstrations.json)."""
    table = json.loads(DEFAULTS_FILE.read_text()) if DEFAULTS_FILE.exists() else {}
    alias = next((k for k, v in hub.ALIASES.items() if v == model_name), None)
    d = table.get(model_name) or table.get(alias)
    return [(d["sentence"], d["word"])] if d else []


def is_pair(d) -> bool:
    """A demonstration: (sentence, word), both strings."""
    return isinstance(d, (list, tuple)) and len(d) == 2 and all(isinstance(x, str) for x in d)


class Embedder:
    """embedder.encode(sentences) -> float32 array (n, hidden), in input order. device="auto" loads
    the model on the CPU and spreads its blocks over the GPUs (the CPU where there is none).
    compile: True runs the decoder's forward through torch.compile (support/compile.py), False
    never; None (auto) compiles on the CPU for an input of at least support.compile.BREAK_EVEN
    sentences: an encode call, a file, or what `expect` announces."""

    def __init__(self, model: str = hub.DEFAULT_MODEL, template: str = "eol", pooling: str = "last",
                 demonstrations="default", max_tokens: int | None = None, batch_size: int = 64,
                 device=None, dtype=None, bits=None, adapter: str | None = None, compile=None):
        if template not in TEMPLATES or pooling not in POOLINGS:
            raise UserError(f"unknown template {template!r} or pooling {pooling!r}: choose a "
                            f"template from {', '.join(TEMPLATES)} and a pooling from "
                            f"{', '.join(POOLINGS)}")
        # An adapter is used without ICL, as in the paper.
        if demonstrations is None or demonstrations == "default":
            paper = template == "eol" and pooling == "last" and not adapter
            demonstrations = default_demonstrations(model) if paper else []
        if max_tokens is not None and max_tokens < 1:
            raise UserError(f"max_tokens={max_tokens}: must be at least 1")
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size}: must be at least 1")
        self.template = template
        self.pooling = pooling
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        auto = device == "auto"            # loaded on the CPU, then spread by corpus.spread
        where = "cpu" if auto else device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:                  # auto: the GPUs' precision, not the CPU's
            dtype = default_dtype("cuda" if auto and torch.cuda.device_count() else where)
        path = hub.resolve(model)
        self.model = M.load(path, dtype=dtype, device=where, bits=bits)
        self.tok = tokenizer.load(path, self.model.config)
        if adapter:
            import lora
            lora.load_adapter(self.model, adapter)
            self.model.eval()
        if auto:
            corpus.spread(self.model)
        self.dtype = self.model.embeddings().weight.dtype
        self.stats = {"sentences": 0, "tokens": 0, "truncated": 0, "seconds": 0.0,
                      "compile_seconds": 0.0}
        self.compile = compile
        self.expected = 0          # sentences announced by `expect`
        self._jit = {}             # "forward": the compiled decoder, or None; shared by copies
        self.fingerprint = fingerprint(self.model.source, adapter, model=model, bits=bits,
                                       dtype=str(self.dtype), template=TEMPLATES[template],
                                       pooling=pooling, max_tokens=max_tokens)
        self._set_demonstrations(demonstrations)

    @property
    def device(self) -> torch.device:
        """Where the inputs go: the embeddings' device."""
        return self.model.embeddings().weight.device

    def _set_demonstrations(self, demos):
        if not (isinstance(demos, (list, tuple)) and all(map(is_pair, demos))):
            raise UserError("demonstrations must be a list of (sentence, word) pairs of strings, "
                            f"not {demos!r:.80}")
        if demos and self.template != "eol":
            raise UserError(f"demonstrations need the 'eol' template, not {self.template!r}")
        self.demonstrations = [tuple(d) for d in demos]
        demo_lists = [list(d) for d in self.demonstrations]
        self.fingerprint = dict(self.fingerprint, demonstrations=demo_lists)
        # The cached prefix stops at the last whitespace before the sentence slot (`...This sentence
        # :`), a boundary no BPE merge crosses in practice; each full prompt is tokenized whole and
        # checked to start with it. Mean pooling averages the whole prompt, so it runs without it.
        demo_texts = [DEMO_FORMAT.format(sentence=s, word=w) for s, w in self.demonstrations]
        self.demo_text = "".join(demo_texts)
        head = self.demo_text + TEMPLATES[self.template].split("{sentence}")[0]
        cached = " " in head and self.pooling == "last"
        self.prefix_text = head[:head.rfind(" ")] if cached else ""
        self.prefix_ids = self.tok.encode(self.prefix_text) if self.prefix_text else []
        self._past = None

    def with_demonstrations(self, demonstrations) -> "Embedder":
        """A copy sharing the loaded model, with other demonstrations (for the ICL search)."""
        other = copy.copy(self)
        other.stats = dict.fromkeys(self.stats, 0)
        other._set_demonstrations(demonstrations)
        return other

    def as_mteb(self, **kw):
        """This configuration as an mteb encoder (mteb.evaluate(e.as_mteb(), tasks)); keywords
        (per-task demonstrations, cache, progress): support.mteb.MtebEncoder."""
        from support.mteb import MtebEncoder
        return MtebEncoder(self, **kw)

    def prompt(self, sentence: str) -> tuple[str, bool]:
        return render(self.tok, sentence, self.template, self.demo_text, self.max_tokens)

    def tokenize(self, sentences, first=1):
        """-> [(prompt ids after the cached prefix, or all ids if it doesn't match; uses the
        prefix)]. Errors name lines counting from `first`."""
        if isinstance(sentences, str):
            raise UserError("encode takes a list of sentences, not one string")
        out = []
        empty = []
        P = len(self.prefix_ids)
        limit = self.model.config.max_position_embeddings
        for n, s in enumerate(sentences, first):
            if not isinstance(s, str):
                raise UserError(f"encode takes strings: sentences[{n - first}] is of type "
                                f"{type(s).__name__}")
            text, cut = self.prompt(s)
            self.stats["truncated"] += cut
            ids = self.tok.encode(text)
            if len(ids) > limit:
                raise UserError(f"sentence at line {n} needs {len(ids)} tokens with its prompt, "
                                f"more than the model's {limit} positions: pass --max-tokens N to "
                                "cut sentences")
            pooled = ids if self.pooling == "last" else [t for t in ids if t != self.tok.bos_id]
            if not pooled:
                empty.append(str(n))
            hit = P > 0 and ids[:P] == self.prefix_ids and len(ids) > P
            out.append((ids[P:] if hit else ids, hit))
        if empty:
            raise UserError(f"empty sentence at line {', '.join(empty)} (counting from 1): "
                            f"template 'none' and {self.pooling} pooling leave it no token to "
                            "pool; drop empty lines or choose a template")
        return out

    def batches(self, items):
        """-> [(uses the prefix cache, indices)]: longest first, so the first batch shows the peak
        memory; sentences with and without the cached prefix go in separate batches."""
        out = []
        for hit in (True, False):
            idx = [i for i, (_, h) in enumerate(items) if h == hit]
            idx.sort(key=lambda i: -len(items[i][0]))
            out += [(hit, idx[j:j + self.batch_size]) for j in range(0, len(idx), self.batch_size)]
        return out

    def pool(self, model, prompts, hit: bool) -> torch.Tensor:
        """(B, H): the pooled states of one batch of prompts through `model`, the decoder or its
        compiled forward; `hit`: they continue the cached prefix."""
        if self.pooling == "last":
            return last_token(model, self.tok, prompts, self._past if hit else None)
        return mean_state(model, self.tok, prompts)

    def expect(self, n: int):
        """Announce n sentences to come in several calls (an evaluation): auto compiling counts
        them."""
        self.expected = n

    def decoder(self, n: int):
        """The decoder for a run of n sentences: compiled when asked, or (auto) when n repays
        compiling; eager where compiling is unavailable (one line says why)."""
        want = jit.pays(n, self.device) if self.compile is None else self.compile
        if not want or self._jit.get("forward", True) is None:
            return self.model
        if "forward" not in self._jit:
            reason = jit.unavailable(self.model)
            if reason:
                print(f"not compiling: {reason}; running eager", file=sys.stderr)
                self._jit["forward"] = None
                return self.model
            forward = jit.compiled(self.model)
            hit = bool(self.prefix_ids) and self.pooling == "last"
            seconds = jit.warm_up(lambda prompts: self.pool(forward, prompts, hit), self.tok,
                                  self.batch_size, self.device)
            self.stats["compile_seconds"] += seconds
            self._jit["forward"] = forward
        return self._jit["forward"]

    @torch.inference_mode()
    def run_batches(self, items, plan, normalize: bool = False, progress: bool = False):
        """-> (indices, float32 array (B, H)) for each batch of `plan` (from `batches`), in order:
        with last pooling, prompteol's `last_token` of each batch after the cached prefix."""
        if self._past is None and self.prefix_ids:   # the prefix runs once; its cache is kept
            prefix = torch.tensor([self.prefix_ids], device=self.device)
            _, self._past = self.model(prefix, use_cache=True)
        sentences = sum(len(idx) for _, idx in plan)
        compiled = self.decoder(max(sentences, self.expected))
        for hit, idx in tqdm(plan, "embed", unit="batch", disable=not progress, file=sys.stderr):
            prompts = [items[i][0] for i in idx]
            # One graph: a batch of one sentence, or off the cached prefix, runs eager.
            usual = hit or not self.prefix_ids
            model = compiled if usual and len(idx) > 1 else self.model
            h = self.pool(model, prompts, hit)                                   # (B, H)
            vecs = h.float().cpu().numpy()
            if normalize:
                vecs /= np.linalg.norm(vecs, axis=1, keepdims=True).clip(min=1e-12)
            self.stats["sentences"] += len(idx)
            self.stats["tokens"] += sum(map(len, prompts)) + len(idx) * len(self.prefix_ids) * hit
            yield idx, vecs

    def encode(self, sentences, normalize: bool = False, progress: bool = False,
               first: int = 1) -> np.ndarray:
        """sentences -> float32 array (n, H) in their order: tokenized, batched longest first,
        each batch through `run_batches`."""
        t0 = time.perf_counter()
        items = self.tokenize(sentences, first)
        out = np.zeros((len(items), self.model.embeddings().embedding_dim), dtype=np.float32)
        for idx, vecs in self.run_batches(items, self.batches(items), normalize, progress):
            out[idx] = vecs
        self.stats["seconds"] += time.perf_counter() - t0
        return out

    def encode_file(self, input_path, output_path, normalize: bool = False,
                    progress: bool = False) -> dict:
        """Each line of a text file (.gz too) -> a row of a .npy, .jsonl or .safetensors file, with
        progress per batch; an interrupted run continues: see support/corpus.py."""
        return corpus.embed_file(self, input_path, output_path, normalize=normalize,
                                 progress=progress)


# ---------------------------------------------------------------------- CLI
def read_stdin() -> list[str]:
    """Sentences piped on stdin, one a line, split as an --input file is: at "\n" only."""
    chunks = corpus.read_chunks(Path("/dev/stdin"), corpus.CHUNK)
    lines = [line for _, chunk in chunks for line in chunk]
    if not lines:
        raise UserError("stdin is empty: nothing to embed")
    return lines


def check_output(path: str | None, quick: bool):
    if path is None:
        if quick:
            return
        raise UserError("no --output: pass --output FILE (.npy, .safetensors or .jsonl) to keep "
                        "the embeddings")
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
                for s, e in zip(sentences, emb, strict=True):
                    row = {"sentence": s, "embedding": [round(float(x), 6) for x in e]}
                    f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}; nothing was written") from None


def parser() -> argparse.ArgumentParser:
    # "resolve": embed.py's own help for two of embedder_flags' flags replaces theirs
    ap = argparse.ArgumentParser(description="PromptEOL sentence embeddings from a decoder LLM.",
                                 conflict_handler="resolve")
    a = ap.add_argument
    a("sentences", nargs="*", help="quick mode: embed these and print their cosine similarities")
    a("--model", default=hub.DEFAULT_MODEL,
      help=f"alias ({', '.join(hub.ALIASES)}), local directory or hub id (default: %(default)s)")
    a("--input", help="file with one sentence per line (default: stdin); empty lines stay rows")
    a("--output", help=".npy, .safetensors or .jsonl file for the embeddings, in input order")
    embedder_flags(ap)
    ap.set_defaults(template="eol", pooling="last")
    a("--device", help="cpu, cuda, cuda:N, or auto: the model's blocks spread over all GPUs, or "
                       "the CPU where there is none (default: cuda if available)")
    a("--data-dir", help="accepted, as by every script; embed.py reads no data folder")
    a("--normalize", action="store_true", help="L2-normalize the embeddings")
    return ap


def speed(emb: Embedder, n: int, seconds: float) -> str:
    """The stats line's rate of n sentences in `seconds`, compiling left out, and the dtype."""
    compiling = emb.stats["compile_seconds"]
    rate = n / max(seconds - compiling, 1e-9)
    line = f"{rate:.1f} sentences/s in {str(emb.dtype).removeprefix('torch.')}"
    if compiling:
        line += f" (compiled: {compiling:.1f} s of it compiling, not in the rate)"
    return line


def summary(emb: Embedder, sentences, args) -> str:
    """The quick and stdin modes' last line: what was embedded, how fast, in which precision."""
    st = emb.stats
    line = f"{st['sentences']} sentences, {st['tokens']} tokens, {st['seconds']:.2f} s, "
    line += speed(emb, st["sentences"], st["seconds"])
    if st["truncated"]:
        line += f", {st['truncated']} truncated to {args.max_tokens} tokens"
    empty = sum(1 for s in sentences if not s.strip())
    if empty:
        line += f", {empty} empty lines kept as rows"
    if args.output:
        line += f" -> {args.output}"
    return line


def main(argv=None):
    args = parser().parse_args(argv)
    positive(batch_size=args.batch_size, max_tokens=args.max_tokens)
    stream = bool(args.input and args.output and not args.sentences)   # a file of any size
    dev = args.device
    if stream:
        dev = corpus.setup(dev)                 # under torchrun: this rank's device
    elif dev != "auto":                         # auto: the Embedder places the model
        dev = device(dev)
    hub.resolve(args.model)  # an unknown model fails now, before reading input or loading weights
    if not (args.sentences or args.input) and sys.stdin.isatty():
        raise UserError("no input: pass sentences as arguments, --input FILE, or pipe them on "
                        "stdin")
    check_output(args.output, quick=bool(args.sentences))
    emb = Embedder(args.model, template=args.template, pooling=args.pooling,
                   max_tokens=args.max_tokens, batch_size=args.batch_size,
                   demonstrations=parse_demonstrations(args.demonstration),
                   device=dev, dtype=args.dtype, bits=args.bits, adapter=args.adapter,
                   compile=args.compile)
    if stream:
        st = emb.encode_file(args.input, args.output, normalize=args.normalize, progress=True)
        if st["rank"] == 0:
            print(f"{st['rows']} sentences, {st['embedded']} embedded by this run in "
                  f"{st['seconds']:.1f} s, {speed(emb, st['embedded'], st['seconds'])} -> "
                  f"{args.output}", file=sys.stderr)
        return
    sentences = args.sentences or read_stdin()
    vecs = emb.encode(sentences, normalize=args.normalize, progress=len(sentences) > 256)
    if args.output:
        write_output(args.output, sentences, vecs)
    if args.sentences:
        u = vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(min=1e-12)
        for s, row in zip(sentences, u @ u.T, strict=True):
            print(" ".join(f"{x:6.3f}" for x in row), " ", s)
    print(summary(emb, sentences, args), file=sys.stderr)


def interrupted(argv=None) -> str:
    """cli's last line after Ctrl-C: what the stopped run kept, read from its progress record."""
    args, _ = parser().parse_known_args(argv)
    kept = corpus.kept(args.output) if args.output else None
    return kept or "nothing was written (an existing --output file is untouched)"


if __name__ == "__main__":
    sys.exit(cli(main, interrupted=interrupted))
