#!/usr/bin/env python
"""Find the in-context demonstration that PromptEOL puts before its template.

Jiang et al. 2023 put one demonstration (`This sentence : "A jockey riding a horse." means in one word:"Equestrian".`)
before the template: of 300 candidates, the best by STS-B dev Spearman (their Table 8). That search comes first;
then extensions: successive halving (fewer encodings; may miss brute force's winner), WordNet, self-labelled ones.

    python icl.py search --model smollm2-135m --write-default      # the paper's 300, halving; --rounds 1: as the paper
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
from support.cli import UserError, cli, data_dir, device, parse_demonstrations, writable
from support.files import write_atomic
from support.provenance import provenance

DEFAULTS_FILE = Path(__file__).resolve().parent / "data" / "demonstrations.json"   # embed.py's defaults
KEPT = "no output written; a re-run resumes from the embedding cache (unless --no-cache)"   # what Ctrl-C leaves


def read_lines(path) -> list[str]:
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


# ----------------------------------------------------------------------------- the paper
def paper_candidates(data=None) -> list[dict]:
    """The paper's 300 (icl_examples.txt): each line is a template with spaces as `_` and one demonstration,
    whose sentence and word are inside the first two pairs of quotes."""
    path = data_dir(data, need="icl") / "icl" / "icl_examples.txt"
    rows = [line.replace("_", " ").split('"') for line in read_lines(path)]
    for n, parts in enumerate(rows, 1):
        if len(parts) < 5 or not parts[1].strip() or not parts[3].strip():
            raise UserError(f"{path}:{n}: expected the demonstration inside the first two pairs of quotes")
    return [{"sentence": parts[1].strip(), "word": parts[3].strip(), "source": "paper"} for parts in rows]


class Scorer:
    """score(candidate or demonstration list, dev pair indices=None) -> STS-B dev Spearman with those demonstrations
    (-inf for constant embeddings). One CachedEncoder per demonstration list: a call encodes only new sentences."""

    def __init__(self, base, data=None, cache_dir=None, disk=True):
        self.base, self.data, self.cache_dir, self.disk, self.encoders = base, data, cache_dir, disk, {}
        self.n_encoded = 0

    def __call__(self, c, idx=None) -> float:
        demos = [(c["sentence"], c["word"])] if isinstance(c, dict) else [tuple(d) for d in c]
        key = json.dumps(demos)
        if key not in self.encoders:
            self.encoders[key] = CachedEncoder(self.base.with_demonstrations(demos), self.cache_dir, disk=self.disk)
        enc, before = self.encoders[key], self.encoders[key].n_encoded
        s = ev.stsb_dev(enc, self.data, idx)
        self.n_encoded += enc.n_encoded - before
        return -math.inf if math.isnan(s) else s

    def drop(self, c):                        # free an eliminated candidate's vectors
        self.encoders.pop(json.dumps([(c["sentence"], c["word"])]), None)


def paper_search(score, candidates) -> list[dict]:
    """The paper's search: each candidate scored on the whole dev set, best first."""
    return sorted(({**c, "spearman": score(c)} for c in candidates), key=lambda c: -c["spearman"])


def write_default(alias, entry, path=None):
    """Put entry under alias in data/demonstrations.json, one line per alias, atomically (all defaults live there)."""
    path = Path(path or DEFAULTS_FILE)
    table = {k: v for k, v in (json.loads(path.read_text()) if path.exists() else {}).items() if k != alias}
    lines = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in {**table, alias: entry}.items()]
    write_atomic(path, "{\n" + ",\n".join(lines) + "\n}\n")


# ----------------------------------------------------------------------------- extension: successive halving
def schedule(n_candidates, n_pairs, start_pairs=100, eta=3.0, rounds=None) -> list[tuple[int, int]]:
    """[(candidates, pairs)] per round: round r scores the best ceil(n / eta^r) on start_pairs * eta^r pairs,
    the last round on all n_pairs. rounds=None runs until the pairs reach n_pairs; rounds=1 is brute force."""
    if eta <= 1 or start_pairs < 2 or (rounds is not None and rounds < 1):
        raise UserError("need --eta > 1, --start-pairs >= 2 and --rounds >= 1")
    start_pairs = min(start_pairs, n_pairs)
    if rounds is None:
        rounds = 1 + math.ceil(math.log(n_pairs / start_pairs, eta) - 1e-9)
    return [(max(1, math.ceil(n_candidates / eta ** r)),
             n_pairs if r == rounds - 1 else min(n_pairs, round(start_pairs * eta ** r))) for r in range(rounds)]


def successive_halving(candidates, score, order, plan, drop=None, progress=False):
    """Score all candidates on the first plan[0][1] pairs of `order`, keep the best plan[1][0] for the first
    plan[1][1] pairs, and so on: nested subsets, so a cached encoder encodes only the new sentences of a round.
    drop(candidate) frees an eliminated one. -> (ranked, furthest round first, with their last score; rounds)."""
    from tqdm import tqdm
    last, alive, rounds = {}, list(range(len(candidates))), []
    for r, (keep, pairs) in enumerate(plan):
        ranked = sorted(alive, key=lambda i: -last[i][0]) if r else alive
        alive = ranked[:keep]
        for i in ranked[keep:] if drop else []:
            drop(candidates[i])
        idx = sorted(int(i) for i in order[:pairs])
        for i in tqdm(alive, desc=f"round {r + 1}/{len(plan)}: {pairs} pairs", unit="cand", disable=not progress):
            last[i] = (score(candidates[i], idx), pairs, r + 1)
        rounds.append({"round": r + 1, "pairs": pairs, "candidates": len(alive),
                       "best": max(last[i][0] for i in alive)})
    ranked = sorted(last, key=lambda i: (-last[i][2], -last[i][0]))
    return [{**candidates[i], "spearman": last[i][0], "pairs": last[i][1], "round": last[i][2]} for i in ranked], rounds


def unique_sentences(dev, idx) -> int:
    return len(set(dev.a[i] for i in idx) | set(dev.b[i] for i in idx))


def planned_encodings(plan, dev, order) -> int:
    """Each candidate costs the unique sentences of the largest pair subset it reaches."""
    keeps = [k for k, _ in plan] + [0]
    return sum((keeps[r] - keeps[r + 1]) * unique_sentences(dev, order[:p]) for r, (_, p) in enumerate(plan))


def search(base, candidates, data=None, start_pairs=100, eta=3.0, rounds=None, seed=0, dev_pairs=None,
           max_k=3, cache_dir=None, disk=True, progress=False) -> dict:
    """Successive halving over seeded dev pairs, then on the full set the baseline without demonstration and the
    best k = 2..max_k concatenated (the best last, next to the input). Prints the plan first; base=None stops there."""
    dev = ev.load_stsb(data_dir(data), "dev")
    order = np.random.default_rng(seed).permutation(len(dev.gold))
    n_pairs = min(dev_pairs or len(order), len(order))
    plan, n_dev = schedule(len(candidates), n_pairs, start_pairs, eta, rounds), unique_sentences(dev, order[:n_pairs])
    need, brute = planned_encodings(plan, dev, order), len(candidates) * n_dev
    print(f"{len(candidates)} candidates; rounds (candidates x pairs): {', '.join(f'{c} x {p}' for c, p in plan)}; "
          f"{need} encodings ({need / brute:.1%} of brute force) + {max(1, max_k) * n_dev} for baseline and k > 1",
          file=sys.stderr)
    if base is None:
        return {}
    score, t0 = Scorer(base, data, cache_dir, disk), time.time()
    ranked, history = successive_halving(candidates, score, order, plan, score.drop, progress)
    full = sorted(int(i) for i in order[:n_pairs])
    best = [[c["sentence"], c["word"]] for c in ranked if c["pairs"] == n_pairs]
    multi = [{"k": k, "demonstrations": best[:k][::-1], "spearman": score(best[:k][::-1], full)}
             for k in range(2, min(max_k, len(best)) + 1)]
    return {"seed": seed, "dev_pairs": n_pairs, "dev_sentences": n_dev, "rounds": history, "k_greater_than_1": multi,
            "schedule": [{"candidates": c, "pairs": p} for c, p in plan], "no_demonstration": score([], full),
            "winner": ranked[0], "encodings": {"needed": need, "brute_force": brute, "spent_this_run": score.n_encoded},
            "search_seconds": round(time.time() - t0, 1), "ranked": ranked}


# ----------------------------------------------------------------------------- extension: WordNet candidates
def wordnet_candidates(data=None, n=200, seed=0, max_definition_words=12, min_senses=2) -> list[dict]:
    """Definition -> headword pairs from WordNet 3.0, like the paper's ("meat from a deer." -> "Venison"): the first
    sense of a lower-case word of 3-12 letters with min_senses senses or more (common words are polysemous), a
    one-clause definition of 3..max_definition_words words sharing no 4-letter start with the word; n, seeded."""
    path = data_dir(data, need="dict") / "dict" / "wordnet30_word_definitions.tsv.gz"
    rows = [line.split("\t") for line in read_lines(path)[1:]]   # word pos sense_rank synset definition examples
    pool, senses = {}, Counter(r[0] for r in rows)
    for word, _pos, rank, _syn, definition, *_ in rows:
        if (rank == "1" and word.isascii() and word.isalpha() and word.islower() and 3 <= len(word) <= 12
                and senses[word] >= min_senses and 3 <= len(definition.split()) <= max_definition_words
                and not any(c in definition for c in ';()"') and word not in pool
                and not any(t.startswith(word[:4]) for t in re.findall(r"[a-z]+", definition.lower()))):
            pool[word] = {"sentence": definition.rstrip(" .") + ".", "word": word.capitalize(), "source": "wordnet"}
    words = sorted(pool)
    pick = np.random.default_rng(seed).choice(len(words), size=min(n, len(words)), replace=False)
    return [pool[words[i]] for i in sorted(pick)]


# ----------------------------------------------------------------------------- extension: self-labelled candidates
def label_words(embedder, sentences, max_new_tokens=8, batch_size=32) -> list[str | None]:
    """The model's own word for each sentence: greedy decoding after `...means in one word:"` up to the closing
    quote; None where no single word comes before it within max_new_tokens, a newline or the end of text."""
    import torch
    model, tok, words = embedder.model, embedder.tok, []

    def reply(ids):  # -> (the word before the closing quote, or None; is the reply over?)
        text = tok.decode(ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids)
        word = text.split('"')[0].strip() if '"' in text.split("\n")[0] else ""
        over = '"' in text or "\n" in text or tok.eos_id in ids
        return (word if re.fullmatch(r"[A-Za-z][A-Za-z-]*", word) else None), over   # one word, as the paper's picks

    with torch.inference_mode():
        for j in range(0, len(sentences), batch_size):
            prompts = [tok.encode(embedder.prompt(s)[0]) for s in sentences[j:j + batch_size]]
            ids, mask = tok.pad(prompts, device=embedder.device)                    # (B, T)
            replies, T = [(None, True)] * len(prompts), ids.shape[1]
            for _ in range(max_new_tokens):
                nxt = model.lm_logits(model(ids, mask)[:, -1]).argmax(-1, keepdim=True)  # (B, H) -> (B, V) -> (B, 1)
                ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
                replies = [reply(row[T:]) for row in ids.tolist()]
                if all(over for _, over in replies):
                    break
            words += [word for word, _ in replies]
    return words


def self_candidates(embedder, data=None, n=100, seed=0, max_words=20, max_new_tokens=8, batch_size=32) -> list[dict]:
    """The paper's ChatGPT-labelled STS-B train sentences, labelled by the model itself: n seeded cased sentences of
    at most max_words words, each with its label_words word; those without one are dropped."""
    path = data_dir(data, need="sts_raw") / "sts_raw" / "stsb" / "sts-train.csv"
    rows = [line.split("\t") for line in read_lines(path)]         # genre file year id score sentence1 sentence2
    pool = list(dict.fromkeys(s.strip() for r in rows if len(r) >= 7 for s in r[5:7]
                              if 0 < len(s.split()) <= max_words and '"' not in s))
    sents = [pool[i] for i in sorted(np.random.default_rng(seed).choice(len(pool), min(n, len(pool)), replace=False))]
    kept = [{"sentence": s, "word": w, "source": "self"}
            for s, w in zip(sents, label_words(embedder, sents, max_new_tokens, batch_size)) if w]
    print(f"self-labelled {len(kept)} of {len(sents)} sentences (the rest had no one-word answer)", file=sys.stderr)
    return kept


# ----------------------------------------------------------------------------- candidate files and CLI
def read_candidates(paths) -> list[dict]:
    """Candidates from JSON-lines files {"sentence", "word", "source"}, the first of each (sentence, word)."""
    out = {}
    for p in paths:
        for n, line in ((n, line) for n, line in enumerate(read_lines(p), 1) if line.strip()):
            try:
                c = json.loads(line)
                out.setdefault((c["sentence"], c["word"]), {"source": Path(p).stem, **c})
            except (json.JSONDecodeError, TypeError, KeyError):  # not JSON, not an object, no sentence or word
                raise UserError(f"{p}:{n}: expected a JSON object with sentence, word and source") from None
    if not out:
        raise UserError("no candidates in " + ", ".join(map(str, paths)))
    return list(out.values())


def load_embedder(args, demos=()):
    from embed import Embedder
    return Embedder(args.model, template="eol", pooling="last", demonstrations=list(demos), max_tokens=args.max_tokens,
                    batch_size=args.batch_size, device=device(args.device), dtype=args.dtype)


def cmd_candidates(args):
    writable("--output", args.output)
    if args.source == "paper":
        cands = paper_candidates(args.data_dir)
    elif args.source == "wordnet":
        cands = wordnet_candidates(args.data_dir, args.n, args.seed)
    else:
        labeller = load_embedder(args, parse_demonstrations(args.demonstration) or [])
        cands = self_candidates(labeller, args.data_dir, args.n, args.seed, batch_size=args.batch_size)
    write_atomic(args.output, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cands))
    print(f"wrote {len(cands)} {args.source} candidates to {args.output}", file=sys.stderr)


def cmd_search(args):
    if args.write_default and args.dev_pairs:
        raise UserError("--write-default needs the full dev set: drop --dev-pairs")
    out = (writable("--output", args.output) if args.output else   # checked before the search, not after it
           Path(f"runs/icl-{args.model.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}.json"))
    files = args.candidates or [data_dir(args.data_dir, need="icl") / "icl" / "icl_examples.txt"]
    candidates = read_candidates(files) if args.candidates else paper_candidates(args.data_dir)
    base, started = None if args.dry_run else load_embedder(args), time.time()
    res = search(base, candidates, args.data_dir, args.start_pairs, args.eta, args.rounds, args.seed, args.dev_pairs,
                 args.max_k, args.cache_dir, disk=not args.no_cache, progress=True)
    if base is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": args.model, "encoder": base.fingerprint, **provenance("icl.py", args.argv, started),
              "candidates": [str(p) for p in files], **res}
    write_atomic(out, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    w, ks = res["winner"], "".join(f"; best {m['k']}: {100 * m['spearman']:.2f}" for m in res["k_greater_than_1"])
    print(f"winner ({w['source']}): {w['sentence']!r} -> {w['word']}: {100 * w['spearman']:.2f}; "
          f"no demonstration: {100 * res['no_demonstration']:.2f}{ks} -> {out}")
    if args.write_default:
        write_default(args.model, {
            "sentence": w["sentence"], "word": w["word"], "source": w["source"], "date": record["started"][:10],
            "dev_spearman": round(w["spearman"], 4), "no_demonstration_dev_spearman": round(res["no_demonstration"], 4),
            "candidates": dict(Counter(c["source"] for c in candidates)), "results": str(out)})
        print(f"wrote the {args.model} default to {DEFAULTS_FILE} (embed.py's default from now on)")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--model", default="smollm2-135m", help="model alias or path (default smollm2-135m)")
    shared.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    shared.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="precision (default: embed.py's)")
    shared.add_argument("--max-tokens", type=int, help="cut sentences to N tokens (default: no cut, as the paper)")
    shared.add_argument("--batch-size", type=int, default=64, help="sentences per forward pass (default 64)")
    shared.add_argument("--data-dir", help="data folder (default: $SENTEMB_DATA, else ./data)")
    shared.add_argument("--seed", type=int, default=0, help="sampling seed / dev-pair order seed (default 0)")
    sub = p.add_subparsers(dest="command", required=True)
    desc = "Write candidate demonstrations as JSON lines {sentence, word, source}."
    c = sub.add_parser("candidates", parents=[shared], help=desc, description=desc)
    c.add_argument("--source", required=True, choices=["paper", "wordnet", "self"],
                   help="the paper's 300, WordNet definition -> headword, or STS-B train labelled by --model")
    c.add_argument("--output", required=True, help="the .jsonl file to write")
    c.add_argument("--n", type=int, default=200, help="wordnet/self: how many to sample (default 200)")
    c.add_argument("--demonstration", action="append", metavar="SENTENCE=>WORD",
                   help="self: label with these demonstrations before the template (default: none)")
    desc = "Find the best demonstration by STS-B dev Spearman (successive halving); prints its plan first."
    s = sub.add_parser("search", parents=[shared], help=desc, description=desc)
    s.add_argument("--candidates", nargs="+", help="candidate .jsonl files (default: the paper's 300)")
    s.add_argument("--start-pairs", type=int, default=100, help="dev pairs of the first round (default 100)")
    s.add_argument("--eta", type=float, default=3.0, help="each round keeps 1/eta of the candidates, eta x the pairs")
    s.add_argument("--rounds", type=int, help="rounds, the last on all pairs (default: as eta needs; 1 = brute force)")
    s.add_argument("--dev-pairs", type=int, help="use only N (seeded) dev pairs as the full set: smoke runs")
    s.add_argument("--max-k", type=int, default=3, help="also score the best 2..K concatenated (default 3; 1 = skip)")
    s.add_argument("--dry-run", action="store_true", help="print the plan and stop; load no model")
    s.add_argument("--output", help="results JSON (default runs/icl-<model>-<time>.json)")
    s.add_argument("--write-default", action="store_true", help="store the winner in data/demonstrations.json")
    s.add_argument("--cache-dir", help="embedding cache root (default $SENTEMB_CACHE or ~/.cache/sentemb)")
    s.add_argument("--no-cache", action="store_true", help="keep vectors in memory only")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    (cmd_candidates if args.command == "candidates" else cmd_search)(args)


if __name__ == "__main__":
    sys.exit(cli(main, interrupted=KEPT))
