#!/usr/bin/env python
"""Find the in-context demonstration that PromptEOL puts before its template.

Jiang et al. 2023 put one demonstration before the template,
`This sentence : "A jockey riding a horse." means in one word:"Equestrian".`, the best of 300
candidates by STS-B dev Spearman (their Table 8). That search comes first; then extensions:
successive halving (fewer encodings; may miss brute force's winner), WordNet, self-labelled ones.

    python icl.py search --model smollm2-135m --write-default   # the paper's 300; --rounds 1: brute
    python icl.py candidates --source wordnet --output runs/cand-wordnet.jsonl
    python icl.py candidates --source self --model smollm2-135m --output runs/cand-self.jsonl
    python icl.py search --model smollm2-135m --candidates runs/cand-*.jsonl
"""
import argparse
import gzip
import json
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

import evaluate as ev
from support.cache import CachedEncoder
from support.cli import (REPO, UserError, cli, data_dir, device, model_flags, parse_demonstrations,
                         positive, writable)
from support.files import write_atomic
from support.hub import DEFAULT_MODEL
from support.provenance import provenance

DEFAULTS_FILE = REPO / "data" / "demonstrations.json"   # embed.py's defaults
# What Ctrl-C leaves behind:
KEPT = "no output written; a re-run resumes from the embedding cache (unless --no-cache)"


def read_lines(path) -> list[str]:
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


# ---------------------------------------------------------------------- the paper
def paper_candidates(data=None) -> list[dict]:
    """The paper's 300 (icl_examples.txt): each line is a template with spaces as `_` and one
    demonstration, whose sentence and word are inside the first two pairs of quotes."""
    path = data_dir(data, need="icl") / "icl" / "icl_examples.txt"
    rows = [line.replace("_", " ").split('"') for line in read_lines(path)]
    for n, parts in enumerate(rows, 1):
        if len(parts) < 5 or not parts[1].strip() or not parts[3].strip():
            raise UserError(f"{path}:{n}: expected the demonstration inside the first two pairs "
                            "of quotes")
    return [{"sentence": parts[1].strip(), "word": parts[3].strip(), "source": "paper"}
            for parts in rows]


class Scorer:
    """score(candidate or demonstration list, dev pair indices=None) -> STS-B dev Spearman with
    those demonstrations (-inf for constant embeddings). One CachedEncoder per demonstration list:
    a call encodes only new sentences."""

    def __init__(self, base, data=None, cache_dir=None, disk=True):
        self.base = base              # the Embedder, whose copies get the demonstrations
        self.data = data
        self.cache_dir = cache_dir
        self.disk = disk
        self.encoders = {}            # JSON of the demonstration list -> its CachedEncoder
        self.n_encoded = 0

    def __call__(self, c, idx=None) -> float:
        demos = [(c["sentence"], c["word"])] if isinstance(c, dict) else [tuple(d) for d in c]
        key = json.dumps(demos)
        if key not in self.encoders:
            embedder = self.base.with_demonstrations(demos)
            self.encoders[key] = CachedEncoder(embedder, self.cache_dir, disk=self.disk)
        enc = self.encoders[key]
        before = enc.n_encoded
        s = ev.stsb_dev(enc, self.data, idx)
        self.n_encoded += enc.n_encoded - before
        return -math.inf if math.isnan(s) else s

    def drop(self, c):                        # free an eliminated candidate's vectors
        self.encoders.pop(json.dumps([(c["sentence"], c["word"])]), None)


def paper_search(score, candidates) -> list[dict]:
    """The paper's search: each candidate scored on the whole dev set, best first."""
    return sorted(({**c, "spearman": score(c)} for c in candidates), key=lambda c: -c["spearman"])


def write_default(alias, entry, path=None):
    """Put entry under alias in data/demonstrations.json (every default lives there), one line per
    alias, atomically."""
    path = Path(path or DEFAULTS_FILE)
    table = json.loads(path.read_text()) if path.exists() else {}
    table = {k: v for k, v in table.items() if k != alias} | {alias: entry}
    lines = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in table.items()]
    write_atomic(path, "{\n" + ",\n".join(lines) + "\n}\n")


# ---------------------------------------------------------------------- successive halving
def schedule(n_candidates, n_pairs, start_pairs=100, eta=3.0, rounds=None) -> list[tuple[int, int]]:
    """[(candidates, pairs)] per round: round r scores the best ceil(n / eta^r) on
    start_pairs * eta^r pairs, the last round on all n_pairs. rounds=None runs until the pairs
    reach n_pairs; rounds=1 is brute force."""
    if eta <= 1:
        raise UserError(f"--eta {eta}: must be above 1")
    if start_pairs < 2:
        raise UserError(f"--start-pairs {start_pairs}: must be at least 2")
    if rounds is not None and rounds < 1:
        raise UserError(f"--rounds {rounds}: must be at least 1")
    start_pairs = min(start_pairs, n_pairs)
    if rounds is None:
        rounds = 1 + math.ceil(math.log(n_pairs / start_pairs, eta) - 1e-9)
    plan = []
    for r in range(rounds):
        pairs = n_pairs if r == rounds - 1 else min(n_pairs, round(start_pairs * eta ** r))
        plan.append((max(1, math.ceil(n_candidates / eta ** r)), pairs))
    return plan


def successive_halving(candidates, score, order, plan, drop=None, progress=False):
    """Score all candidates on the first plan[0][1] pairs of `order`, keep the best plan[1][0] for
    the first plan[1][1] pairs, and so on: nested subsets, so a cached encoder encodes only the new
    sentences of a round. drop(candidate) frees an eliminated one.
    -> (ranked, furthest round first, each with its last score; the rounds)."""
    from tqdm import tqdm
    last = {}                               # candidate index -> (score, pairs, round) it reached
    alive = list(range(len(candidates)))
    rounds = []
    for r, (keep, pairs) in enumerate(plan):
        ranked = sorted(alive, key=lambda i: -last[i][0]) if r else alive
        alive = ranked[:keep]
        for i in ranked[keep:] if drop else []:
            drop(candidates[i])
        idx = sorted(int(i) for i in order[:pairs])
        desc = f"round {r + 1}/{len(plan)}: {pairs} pairs"
        for i in tqdm(alive, desc=desc, unit="cand", disable=not progress):
            last[i] = (score(candidates[i], idx), pairs, r + 1)
        rounds.append({"round": r + 1, "pairs": pairs, "candidates": len(alive),
                       "best": max(last[i][0] for i in alive)})
    ranked = sorted(last, key=lambda i: (-last[i][2], -last[i][0]))
    out = [{**candidates[i], "spearman": last[i][0], "pairs": last[i][1], "round": last[i][2]}
           for i in ranked]
    return out, rounds


def unique_sentences(dev, idx) -> int:
    return len(set(dev.a[i] for i in idx) | set(dev.b[i] for i in idx))


def planned_encodings(plan, dev, order) -> int:
    """Each candidate costs the unique sentences of the largest pair subset it reaches."""
    keeps = [k for k, _ in plan] + [0]
    return sum((keeps[r] - keeps[r + 1]) * unique_sentences(dev, order[:p])
               for r, (_, p) in enumerate(plan))


def search(base, candidates, data=None, start_pairs=100, eta=3.0, rounds=None, seed=0,
           dev_pairs=None, max_k=3, cache_dir=None, disk=True, progress=False) -> dict:
    """Successive halving over seeded dev pairs, then on the full set the baseline without
    demonstration and the best k = 2..max_k concatenated (the best last, next to the input).
    Prints the plan first; base=None stops there."""
    dev = ev.load_stsb(data_dir(data), "dev")
    order = np.random.default_rng(seed).permutation(len(dev.gold))
    n_pairs = min(dev_pairs or len(order), len(order))
    plan = schedule(len(candidates), n_pairs, start_pairs, eta, rounds)
    n_dev = unique_sentences(dev, order[:n_pairs])
    need = planned_encodings(plan, dev, order)
    brute = len(candidates) * n_dev
    steps = ", ".join(f"{c} x {p}" for c, p in plan)
    print(f"{len(candidates)} candidates; rounds (candidates x pairs): {steps}; {need} encodings "
          f"({need / brute:.1%} of brute force) + {max(1, max_k) * n_dev} for baseline and k > 1",
          file=sys.stderr)
    if base is None:
        return {}
    score = Scorer(base, data, cache_dir, disk)
    t0 = time.time()
    ranked, history = successive_halving(candidates, score, order, plan, score.drop, progress)
    full = sorted(int(i) for i in order[:n_pairs])
    best = [[c["sentence"], c["word"]] for c in ranked if c["pairs"] == n_pairs]
    multi = [{"k": k, "demonstrations": best[:k][::-1], "spearman": score(best[:k][::-1], full)}
             for k in range(2, min(max_k, len(best)) + 1)]
    baseline = score([], full)
    encodings = {"needed": need, "brute_force": brute, "spent_this_run": score.n_encoded}
    return {"seed": seed, "dev_pairs": n_pairs, "dev_sentences": n_dev, "rounds": history,
            "k_greater_than_1": multi, "schedule": [{"candidates": c, "pairs": p} for c, p in plan],
            "no_demonstration": baseline, "winner": ranked[0], "encodings": encodings,
            "search_seconds": round(time.time() - t0, 1), "ranked": ranked}


# ---------------------------------------------------------------------- WordNet candidates
def wordnet_candidates(data=None, n=200, seed=0, max_definition_words=12,
                       min_senses=2) -> list[dict]:
    """Definition -> headword pairs from WordNet 3.0, like the paper's ("meat from a deer." ->
    "Venison"): the first sense of a lower-case word of 3-12 letters with min_senses senses or more
    (common words are polysemous), with a one-clause definition of 3..max_definition_words words
    that shares no 4-letter start with the word; n of them, seeded."""
    path = data_dir(data, need="dict") / "dict" / "wordnet30_word_definitions.tsv.gz"
    rows = [line.split("\t") for line in read_lines(path)[1:]]  # word pos rank synset definition ..
    senses = Counter(r[0] for r in rows)
    pool = {}
    for word, _pos, rank, _syn, definition, *_ in rows:
        plain = word.isascii() and word.isalpha() and word.islower() and 3 <= len(word) <= 12
        if rank != "1" or not plain or senses[word] < min_senses or word in pool:
            continue
        length = len(definition.split())
        if not 3 <= length <= max_definition_words or any(c in definition for c in ';()"'):
            continue
        tokens = re.findall(r"[a-z]+", definition.lower())
        if any(t.startswith(word[:4]) for t in tokens):   # "acetic" gives "acetate" away
            continue
        sentence = definition.rstrip(" .") + "."
        pool[word] = {"sentence": sentence, "word": word.capitalize(), "source": "wordnet"}
    words = sorted(pool)
    pick = np.random.default_rng(seed).choice(len(words), size=min(n, len(words)), replace=False)
    return [pool[words[i]] for i in sorted(pick)]


# ---------------------------------------------------------------------- self-labelled candidates
def label_words(embedder, sentences, max_new_tokens=8, batch_size=32) -> list[str | None]:
    """The model's own word for each sentence: greedy decoding after `...means in one word:"` up to
    the closing quote; None where no single word comes before it within max_new_tokens, a newline
    or the end of text."""
    import torch
    model = embedder.model
    tok = embedder.tok
    words = []

    def reply(ids):  # -> (the word before the closing quote, or None; is the reply over?)
        text = tok.decode(ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids)
        word = text.split('"')[0].strip() if '"' in text.split("\n")[0] else ""
        over = '"' in text or "\n" in text or tok.eos_id in ids
        one_word = re.fullmatch(r"[A-Za-z][A-Za-z-]*", word)   # one word, as the paper's picks
        return (word if one_word else None), over

    with torch.inference_mode():
        for j in range(0, len(sentences), batch_size):
            prompts = [tok.encode(embedder.prompt(s)[0]) for s in sentences[j:j + batch_size]]
            ids, mask = tok.pad(prompts, device=embedder.device)            # (B, T)
            start = ids.shape[1]
            replies = [(None, True)] * len(prompts)
            for _ in range(max_new_tokens):
                hidden = model(ids, mask)[:, -1]                            # (B, H)
                nxt = model.lm_logits(hidden).argmax(-1, keepdim=True)      # (B, V) -> (B, 1)
                ids = torch.cat([ids, nxt], 1)                              # (B, T + 1)
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                replies = [reply(row[start:]) for row in ids.tolist()]
                if all(over for _, over in replies):
                    break
            words += [word for word, _ in replies]
    return words


def self_candidates(embedder, data=None, n=100, seed=0, max_words=20, max_new_tokens=8,
                    batch_size=32) -> list[dict]:
    """The paper's ChatGPT-labelled STS-B train sentences, labelled by the model itself: n seeded
    cased sentences of at most max_words words, each with its label_words word; those without one
    are dropped."""
    path = data_dir(data, need="sts_raw") / "sts_raw" / "stsb" / "sts-train.csv"
    rows = [line.split("\t") for line in read_lines(path)]  # genre file year id score s1 s2
    fits = [s.strip() for r in rows if len(r) >= 7 for s in r[5:7]
            if 0 < len(s.split()) <= max_words and '"' not in s]
    pool = list(dict.fromkeys(fits))
    pick = np.random.default_rng(seed).choice(len(pool), min(n, len(pool)), replace=False)
    sents = [pool[i] for i in sorted(pick)]
    words = label_words(embedder, sents, max_new_tokens, batch_size)
    kept = [{"sentence": s, "word": w, "source": "self"}
            for s, w in zip(sents, words, strict=True) if w]
    print(f"self-labelled {len(kept)} of {len(sents)} sentences (the rest had no one-word answer)",
          file=sys.stderr)
    return kept


# ---------------------------------------------------------------------- candidate files and CLI
def read_candidates(paths) -> list[dict]:
    """Candidates from JSON-lines files {"sentence", "word", "source"}, the first of each
    (sentence, word)."""
    out = {}
    for p in paths:
        for n, line in enumerate(read_lines(p), 1):
            if not line.strip():
                continue
            try:
                c = json.loads(line)
                out.setdefault((c["sentence"], c["word"]), {"source": Path(p).stem, **c})
            except (json.JSONDecodeError, TypeError, KeyError):  # not an object with both keys
                raise UserError(f"{p}:{n}: expected a JSON object with sentence, word and source"
                                ) from None
    if not out:
        raise UserError("no candidates in " + ", ".join(map(str, paths)))
    return list(out.values())


def load_embedder(args, demos=()):
    """PromptEOL with last-token pooling (demonstrations are written for its template)."""
    from embed import Embedder
    return Embedder(args.model, template="eol", pooling="last", demonstrations=list(demos),
                    max_tokens=args.max_tokens, batch_size=args.batch_size,
                    device=device(args.device), dtype=args.dtype, bits=args.bits,
                    adapter=args.adapter)


def cmd_candidates(args):
    writable("--output", args.output)
    if args.source == "paper":
        cands = paper_candidates(args.data_dir)
    elif args.source == "wordnet":
        cands = wordnet_candidates(args.data_dir, args.n, args.seed)
    else:
        labeller = load_embedder(args, parse_demonstrations(args.demonstration) or [])
        cands = self_candidates(labeller, args.data_dir, args.n, args.seed,
                                batch_size=args.batch_size)
    write_atomic(args.output, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cands))
    print(f"wrote {len(cands)} {args.source} candidates to {args.output}", file=sys.stderr)


def cmd_search(args, argv):
    if args.write_default and args.dev_pairs:
        raise UserError("--write-default needs the full dev set: drop --dev-pairs")
    if args.write_default and args.adapter:
        raise UserError("--write-default stores the model's default, which embed.py uses without "
                        "an adapter: drop --adapter")
    if args.output:
        out = writable("--output", args.output)   # checked before the search, not after it
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = REPO / "runs" / f"icl-{args.model.replace('/', '_')}-{stamp}.json"
    files = args.candidates or [data_dir(args.data_dir, need="icl") / "icl" / "icl_examples.txt"]
    candidates = read_candidates(files) if args.candidates else paper_candidates(args.data_dir)
    started = time.time()
    base = None if args.dry_run else load_embedder(args)
    res = search(base, candidates, args.data_dir, args.start_pairs, args.eta, args.rounds,
                 args.seed, args.dev_pairs, args.max_k, args.cache_dir, disk=not args.no_cache,
                 progress=True)
    if base is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    label = f"{args.model} + {args.adapter}" if args.adapter else args.model
    record = {"model": label, "encoder": base.fingerprint, **provenance("icl.py", argv, started),
              "candidates": [str(p) for p in files], **res}
    write_atomic(out, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    w = res["winner"]
    ks = "".join(f"; best {m['k']}: {100 * m['spearman']:.2f}" for m in res["k_greater_than_1"])
    print(f"winner ({w['source']}): {w['sentence']!r} -> {w['word']}: {100 * w['spearman']:.2f}; "
          f"no demonstration: {100 * res['no_demonstration']:.2f}{ks} -> {out}")
    if args.write_default:
        write_default(args.model, {
            "sentence": w["sentence"], "word": w["word"], "source": w["source"],
            "date": record["started"][:10], "dev_spearman": round(w["spearman"], 4),
            "no_demonstration_dev_spearman": round(res["no_demonstration"], 4),
            "candidates": dict(Counter(c["source"] for c in candidates)), "results": str(out)})
        print(f"wrote the {args.model} default to {DEFAULTS_FILE} (embed.py's default from now on)")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = argparse.ArgumentParser(add_help=False)   # both commands' flags, as embed.py's
    a = shared.add_argument
    a("--model", default=DEFAULT_MODEL, help=f"model alias or path (default {DEFAULT_MODEL})")
    model_flags(shared)
    a("--seed", type=int, default=0, help="sampling seed / dev-pair order seed (default 0)")
    sub = p.add_subparsers(dest="command", required=True)

    desc = "Write candidate demonstrations as JSON lines {sentence, word, source}."
    c = sub.add_parser("candidates", parents=[shared], help=desc, description=desc)
    c.add_argument("--source", required=True, choices=["paper", "wordnet", "self"],
                   help="the paper's 300, WordNet definition -> headword, or STS-B train "
                        "labelled by --model")
    c.add_argument("--output", required=True, help="the .jsonl file to write")
    c.add_argument("--n", type=int, default=200,
                   help="wordnet/self: how many to sample (default 200)")
    c.add_argument("--demonstration", action="append", metavar="SENTENCE=>WORD",
                   help="self: label with these demonstrations before the template (default: none)")

    desc = "Find the best demonstration by STS-B dev Spearman (successive halving)."
    s = sub.add_parser("search", parents=[shared], help=desc, description=desc)
    a = s.add_argument
    a("--candidates", nargs="+", help="candidate .jsonl files (default: the paper's 300)")
    a("--start-pairs", type=int, default=100, help="dev pairs of the first round (default 100)")
    a("--eta", type=float, default=3.0,
      help="each round keeps 1/eta of the candidates on eta x the pairs (default 3)")
    a("--rounds", type=int,
      help="rounds, the last on all pairs (default: as eta needs; 1 = brute force)")
    a("--dev-pairs", type=int, help="use only N (seeded) dev pairs as the full set: smoke runs")
    a("--max-k", type=int, default=3,
      help="also score the best 2..K concatenated (default 3; 1 = skip)")
    a("--dry-run", action="store_true", help="print the plan and stop; load no model")
    a("--output", help="results JSON (default runs/icl-<model>-<time>.json)")
    a("--write-default", action="store_true", help="store the winner in data/demonstrations.json")
    a("--cache-dir", help="embedding cache root (default $SENTEMB_CACHE or ~/.cache/sentemb)")
    a("--no-cache", action="store_true", help="keep vectors in memory only")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    positive(batch_size=args.batch_size, max_tokens=args.max_tokens)
    if args.command == "candidates":
        positive(n=args.n)
        cmd_candidates(args)
    else:
        positive(dev_pairs=args.dev_pairs, max_k=args.max_k)
        cmd_search(args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli(main, interrupted=KEPT))
