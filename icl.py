#!/usr/bin/env python
"""Find the in-context demonstration that PromptEOL puts before its template.

Jiang et al. 2023, "Scaling Sentence Embeddings with Large Language Models": one
demonstration -- a sentence and the one word that sums it up --
    This sentence : "A jockey riding a horse." means in one word:"Equestrian".
placed before the PromptEOL template raises STS scores without any training. Their 300
candidates were 100 STS-B train sentences labelled with a word by ChatGPT and 200 Oxford
dictionary definitions with their headword; each was scored by Spearman on STS-B dev and the
best kept per model (their Table 8). Here:

    python icl.py candidates --source paper --out runs/cand-paper.jsonl
    python icl.py candidates --source wordnet --n 200 --out runs/cand-wordnet.jsonl
    python icl.py candidates --source self --model smollm2-135m --n 100 --out runs/cand-self.jsonl
    python icl.py search --model smollm2-135m --candidates runs/cand-*.jsonl --write-default

Candidate files are JSON lines {"sentence", "word", "source"}. The search is successive halving
over STS-B dev pairs instead of the paper's brute force (300 candidates x 2,909 sentences).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

import evaluate as ev
from common import DOWNLOAD_HINT, CachedEncoder, UserError, data_dir, git_commit

REPO = Path(__file__).resolve().parent
DEFAULTS_FILE = REPO / "data" / "demonstrations.json"   # what embed.default_demonstrations reads
WORD = re.compile(r"[A-Za-z][A-Za-z-]*")                # one word, as in all of the paper's picks


# ----------------------------------------------------------------------------- candidates
def paper_candidates(data=None) -> list[dict]:
    """The paper's 300 (kongds/scaling_sentemb icl_examples.txt): each line is a whole
    one-demonstration template with spaces written as `_`; the demonstration's sentence and
    word are inside its first two pairs of quotes."""
    path = data_dir(data) / "icl" / "icl_examples.txt"
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.replace("_", " ").split('"')
        if len(parts) < 5 or not parts[1].strip() or not parts[3].strip():
            raise ValueError(f"{path}:{n}: expected the demonstration inside the first two pairs of quotes")
        out.append({"sentence": parts[1].strip(), "word": parts[3].strip(), "source": "paper"})
    return out


def wordnet_candidates(data=None, n=200, seed=0, max_definition_words=12, min_senses=2) -> list[dict]:
    """Definition -> headword pairs from WordNet 3.0, written like the paper's dictionary
    entries ("meat from a deer." -> "Venison"). Kept: the first (most frequent) sense of a
    lower-case alphabetic single word of 3-12 letters with at least `min_senses` senses (a
    proxy for a common word: frequent words are polysemous), a one-clause definition of
    3..max_definition_words words that does not give the word away (no definition word shares
    its first four letters). Then a seeded sample of n, one per word."""
    path = data_dir(data) / "dict" / "wordnet30_word_definitions.tsv.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]   # word pos sense_rank synset definition examples
    senses = Counter(r[0] for r in rows)
    pool = {}
    for word, _pos, rank, _syn, definition, *_ in rows:
        tokens = re.findall(r"[a-z]+", definition.lower())
        if (rank == "1" and word.isascii() and word.isalpha() and word.islower() and 3 <= len(word) <= 12
                and senses[word] >= min_senses and 3 <= len(definition.split()) <= max_definition_words
                and not any(c in definition for c in ';()"') and word not in pool
                and not any(len(os.path.commonprefix([t, word])) >= min(4, len(word)) for t in tokens)):
            pool[word] = {"sentence": definition.strip().rstrip(".") + ".", "word": word.capitalize(), "source": "wordnet"}
    words = sorted(pool)
    pick = np.random.default_rng(seed).choice(len(words), size=min(n, len(words)), replace=False)
    return [pool[words[i]] for i in sorted(pick)]


def stsb_train_sentences(data=None) -> list[str]:
    """Unique STS-B train sentences as released (cased, untokenized, like the paper's picks)."""
    path = data_dir(data) / "sts_raw" / "stsb" / "sts-train.csv"
    if not path.is_file():
        raise UserError(f"missing {path}: {DOWNLOAD_HINT}")
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(s.strip() for r in rows if len(r) >= 7 for s in r[5:7] if s.strip()))


def label_words(embedder, sentences, max_new_tokens=8, batch_size=32) -> list[str | None]:
    """The model's own word for each sentence: greedy decoding after the PromptEOL template
    (`...means in one word:"`), stopped at the closing quote. None where no single word came
    before the quote within max_new_tokens. Prompts of equal token length are batched together,
    so no padding is needed and the key/value cache can grow step by step."""
    import torch
    model, tok = embedder.model, embedder.tok
    prompts = [tok.encode(embedder.prompt(s)[0]) for s in sentences]
    groups = {}
    for i, ids in enumerate(prompts):
        groups.setdefault(len(ids), []).append(i)
    words = [None] * len(sentences)
    with torch.inference_mode():
        for members in groups.values():
            for j in range(0, len(members), batch_size):
                rows = members[j:j + batch_size]
                ids = torch.tensor([prompts[i] for i in rows], device=embedder.device)
                h, past = model(ids, use_cache=True)
                new, done = [[] for _ in rows], [False] * len(rows)
                for _ in range(max_new_tokens):
                    nxt = model.lm_logits(h[:, -1]).argmax(-1)                  # greedy
                    for r, t in enumerate(nxt.tolist()):
                        if done[r]:
                            continue
                        new[r].append(t)
                        text = tok.decode(new[r])
                        if '"' in text:                                         # the word is closed
                            done[r] = True
                            word = text.split('"')[0].strip()
                            words[rows[r]] = word if WORD.fullmatch(word) else None
                        elif t == tok.eos_id or "\n" in text:
                            done[r] = True
                    if all(done):
                        break
                    h, past = model(nxt[:, None], past=past, use_cache=True)
    return words


def self_candidates(embedder, data=None, n=100, seed=0, max_words=20, max_new_tokens=8) -> list[dict]:
    """The paper's ChatGPT-labelled STS-B sentences, with the model labelling them itself: a
    seeded sample of n train sentences of at most max_words words, each given the word the
    model decodes greedily after the PromptEOL template. Sentences without a clean one-word
    answer are dropped (reported on stderr)."""
    pool = [s for s in stsb_train_sentences(data) if len(s.split()) <= max_words and '"' not in s]
    pick = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    sents = [pool[i] for i in sorted(pick)]
    words = label_words(embedder, sents, max_new_tokens)
    kept = [{"sentence": s, "word": w, "source": "self"} for s, w in zip(sents, words) if w]
    print(f"self-labelled {len(kept)} of {len(sents)} sentences (the rest had no one-word answer "
          f"before the closing quote)", file=sys.stderr)
    return kept


def write_jsonl(path, candidates):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in candidates)


def read_candidates(paths) -> list[dict]:
    """Candidates from JSON-lines files, first occurrence of each (sentence, word) kept."""
    out = {}
    for p in paths:
        for n, line in enumerate(Path(p).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                c = json.loads(line)
                if not (isinstance(c, dict) and c.get("sentence") and c.get("word")):
                    raise UserError(f"{p}:{n}: expected a JSON object with sentence, word, source")
                out.setdefault((c["sentence"], c["word"]), {**c, "source": c.get("source", Path(p).stem)})
    if not out:
        raise UserError("no candidates in " + ", ".join(map(str, paths)))
    return list(out.values())


# ----------------------------------------------------------------------------- search
def schedule(n_candidates, n_pairs, start_pairs=100, eta=3.0, rounds=None) -> list[tuple[int, int]]:
    """[(candidates, pairs)] per round of successive halving: round r scores the best
    ceil(n / eta^r) on start_pairs * eta^r pairs; the last round always uses all n_pairs.
    rounds=None runs until the pairs reach n_pairs; rounds=1 is brute force."""
    if eta <= 1 or start_pairs < 2:
        raise UserError("need --eta > 1 and --start-pairs >= 2")
    start_pairs = min(start_pairs, n_pairs)
    if rounds is None:
        rounds = 1 + math.ceil(math.log(n_pairs / start_pairs, eta) - 1e-9)
    if rounds < 1:
        raise UserError("--rounds must be at least 1")
    return [(max(1, math.ceil(n_candidates / eta ** r)),
             n_pairs if r == rounds - 1 else min(n_pairs, round(start_pairs * eta ** r))) for r in range(rounds)]


def successive_halving(candidates, score, order, plan, drop=None, progress=False):
    """Score every candidate on the first plan[0][1] pairs of `order` (a seeded permutation of
    the dev pairs), keep the best plan[1][0] and score them on the first plan[1][1] pairs, and
    so on. The subsets are nested, so with a cached encoder each round encodes only the
    sentences new to it. score(candidate, pair indices) -> Spearman; drop(candidate) is called
    when a candidate is eliminated (to free its vectors). Returns (ranked, rounds): ranked
    candidates, those that went furthest first, each with the score of its last round."""
    from tqdm import tqdm
    last, alive, rounds = {}, list(range(len(candidates))), []
    for r, (keep, pairs) in enumerate(plan):
        if r:
            ranked = sorted(alive, key=lambda i: -last[i][0])
            alive = ranked[:keep]
            for i in ranked[keep:] if drop else []:
                drop(candidates[i])
        idx = sorted(int(i) for i in order[:pairs])
        for i in tqdm(alive, desc=f"round {r + 1}/{len(plan)}: {pairs} pairs", unit="cand", disable=not progress):
            s = score(candidates[i], idx)
            last[i] = (-math.inf if math.isnan(s) else s, pairs, r + 1)
        rounds.append({"round": r + 1, "pairs": pairs, "candidates": len(alive),
                       "best": max(last[i][0] for i in alive)})
    ranked = sorted(last, key=lambda i: (-last[i][2], -last[i][0]))
    return [{**candidates[i], "spearman": last[i][0], "pairs": last[i][1], "round": last[i][2]} for i in ranked], rounds


class Scorer:
    """STS-B dev Spearman of the base encoder with a given list of demonstrations, through one
    CachedEncoder per demonstration list: the search's later rounds reuse earlier vectors, and
    the disk cache lets an interrupted search resume. base needs with_demonstrations()."""

    def __init__(self, base, data=None, cache_dir=None, disk=True):
        self.base, self.data, self.cache_dir, self.disk, self.encoders = base, data, cache_dir, disk, {}
        self.n_encoded = 0                    # sentences sent to the model, over all demonstrations

    @staticmethod
    def demos(c):
        return [(c["sentence"], c["word"])] if isinstance(c, dict) else [tuple(d) for d in c]

    def __call__(self, c, idx=None) -> float:
        key = json.dumps(self.demos(c))
        if key not in self.encoders:
            enc = self.base.with_demonstrations(self.demos(c))
            self.encoders[key] = CachedEncoder(enc, self.cache_dir, disk=self.disk)
        enc = self.encoders[key]
        before = enc.n_encoded
        s = ev.stsb_dev(enc, self.data, idx)
        self.n_encoded += enc.n_encoded - before
        return s

    def drop(self, c):
        self.encoders.pop(json.dumps(self.demos(c)), None)


def unique_sentences(dev, idx) -> int:
    return len(set(dev.a[i] for i in idx) | set(dev.b[i] for i in idx))


def planned_encodings(plan, dev, order) -> int:
    """Encodings a plan needs: each candidate costs the unique sentences of the largest pair
    subset it reaches (the nested subsets make earlier rounds' vectors reusable)."""
    keeps = [k for k, _ in plan] + [0]
    return sum((keeps[r] - keeps[r + 1]) * unique_sentences(dev, order[:p]) for r, (_, p) in enumerate(plan))


# ----------------------------------------------------------------------------- defaults
def write_default(alias, entry, path=None):
    """Put entry (sentence, word, ...) under alias in data/demonstrations.json, as its last
    line; other aliases keep their lines and order (one JSON object per alias and line)."""
    path = Path(path or DEFAULTS_FILE)
    table = json.loads(path.read_text()) if path.exists() else {}
    table.pop(alias, None)
    table[alias] = entry
    lines = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in table.items()]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


# ----------------------------------------------------------------------------- CLI
def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cmd_candidates(args):
    if args.source == "paper":
        cands = paper_candidates(args.data_dir)
    elif args.source == "wordnet":
        cands = wordnet_candidates(args.data_dir, args.n, args.seed, args.max_definition_words, args.min_senses)
    else:
        from common import parse_demonstrations
        from embed import Embedder
        demos = parse_demonstrations(args.label_demonstration) or []
        emb = Embedder(args.model, demonstrations=demos, device=args.device, dtype=args.dtype)
        cands = self_candidates(emb, args.data_dir, args.n, args.seed, max_new_tokens=args.max_new_tokens)
    write_jsonl(args.out, cands)
    print(f"wrote {len(cands)} {args.source} candidates to {args.out}", file=sys.stderr)


def plan_search(n_candidates, data=None, start_pairs=100, eta=3.0, rounds=None, seed=0, dev_pairs=None):
    """-> (STS-B dev, seeded pair order, pairs of the full set, rounds' schedule)."""
    dev = ev.load_stsb(data_dir(data), "dev")
    order = np.random.default_rng(seed).permutation(len(dev.gold))
    n_pairs = min(dev_pairs or len(order), len(order))
    return dev, order, n_pairs, schedule(n_candidates, n_pairs, start_pairs, eta, rounds)


def search(base, candidates, data=None, start_pairs=100, eta=3.0, rounds=None, seed=0, dev_pairs=None,
           max_k=3, cache_dir=None, disk=True, progress=False) -> dict:
    """Successive halving over the candidates, then the no-demonstration baseline and the best
    k = 2..max_k concatenated, all on the full dev set (or its first dev_pairs pairs)."""
    dev, order, n_pairs, plan = plan_search(len(candidates), data, start_pairs, eta, rounds, seed, dev_pairs)
    score = Scorer(base, data, cache_dir, disk)
    t0 = time.time()
    ranked, history = successive_halving(candidates, score, order, plan, score.drop, progress)
    full = sorted(int(i) for i in order[:n_pairs])
    finalists = [c for c in ranked if c["pairs"] == n_pairs]
    # k > 1 (the paper uses one): the best k finalists concatenated, the best one last (next to
    # the input sentence), so each k adds a demonstration in front of the (k-1) prompt.
    multi = []
    for k in range(2, min(max_k, len(finalists)) + 1):
        demos = [(c["sentence"], c["word"]) for c in finalists[:k][::-1]]
        multi.append({"k": k, "demonstrations": [list(d) for d in demos], "spearman": score(demos, full)})
    baseline = score([], full)
    n_dev = unique_sentences(dev, order[:n_pairs])
    return {
        "dev_pairs": n_pairs, "dev_sentences": n_dev, "seed": seed,
        "schedule": [{"candidates": c, "pairs": p} for c, p in plan], "rounds": history,
        "no_demonstration": baseline, "winner": ranked[0], "k_greater_than_1": multi,
        "best_per_source": {src: next(c for c in ranked if c["source"] == src)
                            for src in sorted({c["source"] for c in ranked})},
        "encodings": {"needed": planned_encodings(plan, dev, order), "spent_this_run": score.n_encoded,
                      "brute_force": len(candidates) * n_dev,
                      "note": "needed = unique dev sentences each candidate was scored on; spent excludes "
                              "vectors found in the disk cache, and includes the baseline and k > 1"},
        "search_seconds": round(time.time() - t0, 1), "ranked": ranked,
    }


def cmd_search(args):
    if args.write_default and (args.dev_pairs or args.limit):
        raise UserError("--write-default needs the full dev set and all candidates: drop --dev-pairs/--limit")
    data_dir(args.data_dir)
    candidates = read_candidates(args.candidates)[:args.limit]
    if args.dry_run:
        dev, order, n_pairs, plan = plan_search(len(candidates), args.data_dir, args.start_pairs, args.eta,
                                                args.rounds, args.seed, args.dev_pairs)
        n_dev = unique_sentences(dev, order[:n_pairs])
        need, brute = planned_encodings(plan, dev, order), len(candidates) * n_dev
        print("rounds (candidates x pairs): " + ", ".join(f"{c} x {p}" for c, p in plan))
        print(f"encodings: {need} for the search (+ {max(1, args.max_k) * n_dev} for the baseline and k > 1) "
              f"vs {brute} brute force ({need / brute:.1%})")
        return
    from embed import Embedder
    base = Embedder(args.model, demonstrations=[], batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    res = search(base, candidates, args.data_dir, args.start_pairs, args.eta, args.rounds, args.seed,
                 args.dev_pairs, args.max_k, args.cache_dir, not args.no_cache, progress=True)
    settings = {"start_pairs": args.start_pairs, "eta": args.eta, "rounds": len(res["schedule"]),
                "seed": args.seed, "dev_pairs": res["dev_pairs"]}
    record = {"model": args.model, "encoder": base.fingerprint, "started": started, "settings": settings,
              "candidates": {str(p): sha256(p) for p in args.candidates}, "n_candidates": len(candidates),
              "command": ["icl.py", *args.argv], "git_commit": git_commit(), **res}
    out = Path(args.out or REPO / "runs" / f"icl-{args.model.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"{'rank':>4} {'spearman':>8} {'pairs':>5}  source   demonstration")
    for i, c in enumerate(res["ranked"][:args.show], 1):
        print(f"{i:4d} {100 * c['spearman']:8.2f} {c['pairs']:5d}  {c['source']:<8} {c['sentence']!r} -> {c['word']}")
    print(f"no demonstration: {100 * res['no_demonstration']:.2f} on {res['dev_pairs']} pairs")
    for m in res["k_greater_than_1"]:
        print(f"best {m['k']} concatenated: {100 * m['spearman']:.2f}")
    e = res["encodings"]
    print(f"encodings: {e['needed']} needed ({e['spent_this_run']} run now) vs {e['brute_force']} brute force "
          f"({e['needed'] / e['brute_force']:.1%}); {res['search_seconds']} s -> {out}")
    if args.write_default:
        w, e = res["winner"], res["encodings"]
        write_default(args.model, {
            "sentence": w["sentence"], "word": w["word"], "source": w["source"],
            "found_by": "icl.py search: successive halving, best by STS-B dev Spearman (full dev set)",
            "dev_spearman": round(w["spearman"], 4), "no_demonstration_dev_spearman": round(res["no_demonstration"], 4),
            "best_k_dev_spearman": {str(m["k"]): round(m["spearman"], 4) for m in res["k_greater_than_1"]},
            "search": {**settings, "candidates": dict(Counter(c["source"] for c in candidates)),
                       "encodings": e["needed"], "brute_force_encodings": e["brute_force"]},
            "date": started[:10], "results": str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out)})
        print(f"wrote the {args.model} default to {DEFAULTS_FILE} (embed.py's default from now on)")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("candidates", help="write a candidate file (JSON lines: sentence, word, source)")
    c.add_argument("--source", required=True, choices=["paper", "wordnet", "self"],
                   help="paper: the paper's 300; wordnet: WordNet 3.0 definition -> headword; "
                        "self: STS-B train sentences labelled by --model itself")
    c.add_argument("--out", required=True, help="output .jsonl file")
    c.add_argument("--n", type=int, default=200, help="wordnet/self: how many to sample (default 200)")
    c.add_argument("--seed", type=int, default=0, help="wordnet/self: sampling seed (default 0)")
    c.add_argument("--max-definition-words", type=int, default=12, help="wordnet: longest definition kept (default 12)")
    c.add_argument("--min-senses", type=int, default=2,
                   help="wordnet: keep words with at least this many senses, a commonness proxy (default 2)")
    c.add_argument("--model", default="smollm2-135m", help="self: the labelling model (default smollm2-135m)")
    c.add_argument("--label-demonstration", action="append", metavar="SENTENCE=>WORD",
                   help="self: label one-shot with this demonstration before the template (default: zero-shot)")
    c.add_argument("--max-new-tokens", type=int, default=8, help="self: give up on a word after this many tokens (default 8)")
    s = sub.add_parser("search", help="find the best demonstration by STS-B dev Spearman")
    s.add_argument("--model", default="smollm2-135m", help="model alias or path for embed.Embedder (default smollm2-135m)")
    s.add_argument("--candidates", nargs="+", required=True, help="candidate .jsonl files (from `icl.py candidates`)")
    s.add_argument("--start-pairs", type=int, default=100, help="dev pairs of the first round (default 100)")
    s.add_argument("--eta", type=float, default=3.0,
                   help="each round keeps 1/eta of the candidates and has eta times the pairs (default 3)")
    s.add_argument("--rounds", type=int, help="number of rounds, the last on all pairs (default: until the "
                   "pairs reach the full dev set; 1 = brute force)")
    s.add_argument("--seed", type=int, default=0, help="seed of the dev-pair order (default 0)")
    s.add_argument("--dev-pairs", type=int, help="use only this many (seeded) dev pairs as the full set: smoke runs")
    s.add_argument("--limit", type=int, help="use only the first N candidates: smoke runs")
    s.add_argument("--max-k", type=int, default=3, help="also score the best 2..K concatenated (default 3; 1 = skip)")
    s.add_argument("--dry-run", action="store_true", help="print the rounds and the encodings they need; load no model")
    s.add_argument("--show", type=int, default=20, help="print the top N of the ranked list (default 20)")
    s.add_argument("--out", help="results JSON (default runs/icl-<model>-<time>.json)")
    s.add_argument("--write-default", action="store_true",
                   help="store the winner as the model's default in data/demonstrations.json")
    s.add_argument("--batch-size", type=int, default=64, help="sentences per forward pass (default 64)")
    s.add_argument("--cache-dir", help="embedding cache root (default $SENTEMB_CACHE or ~/.cache/sentemb)")
    s.add_argument("--no-cache", action="store_true", help="keep vectors in memory only")
    for q in (c, s):
        q.add_argument("--device", help="self/search: cpu, cuda ... (default: cuda if available)")
        q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="self/search: default embed.py's")
        q.add_argument("--data-dir", help="data folder (default: $SENTEMB_DATA, else ./data)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        (cmd_candidates if args.command == "candidates" else cmd_search)(args)
    except (UserError, ValueError, OSError) as e:
        print(f"icl.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("icl.py: interrupted (vectors computed so far are cached; rerun to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
