#!/usr/bin/env python
"""Download the data sets into the layout that evaluate.py, icl.py and train_cse.py read.

    python data/download.py                      # everything, into data/ next to this script
    python data/download.py --sets sts,transfer  # only what `evaluate.py --tasks all` needs
    python data/download.py --list               # what comes from where; nothing is fetched
    python data/download.py --dest /somewhere    # then: export SENTEMB_DATA=/somewhere

Where the files come from: SentEval's own data script (facebookresearch/SentEval,
data/downstream/get_transfer_data.bash) fetches STS12-16, STS-B, SICK, MR/CR/SUBJ/MPQA, SST,
TREC and MRPC from their original hosts, several of which are gone now, and then tokenizes
them. We fetch the result of that script as committed in public SimCSE checkouts, at pinned
commits, plus the original STS releases (sts_raw/), PromptEOL's 300 demonstrations
(kongds/scaling_sentemb) and SimCSE's NLI training triplets (princeton-nlp on Hugging Face).
Every file except that last one is checked against its sha256 in data/SHA256SUMS, so a download
is byte-identical to the data the project's numbers were measured on. Files already present
with the right checksum are skipped, and each file is written atomically: rerunning after an
interruption resumes. The files in NOT_DOWNLOADED are derived ones; --list says where each comes
from.
"""
import argparse
import hashlib
import io
import pathlib
import sys
import urllib.request
import zipfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from support.cli import UserError, cli  # noqa: E402
from support.files import atomic  # noqa: E402
COMMITS = {
    "leotmc/simcse": "e0b62fcef5dadeeef55aef3b640ab219860c201b",          # SentEval's STS, SICK
    "robertoviegas/SimCSE": "a0d98a537ceffe5f728077dd0930c41171db2d16",   # transfer, SNLI
    "amao0o0/SynWMD": "59042a92e862db58bd01e47914345d2f52d2a4a3",          # original STS releases
    "brmson/dataset-sts": "e1d3375f5b3bc24f21aa4e46f96eb379e9fc1081",      # original SICK release
    "kongds/scaling_sentemb": "8567aa083c1b3c77586670f91e7f78eb80694ad3",  # demonstrations
}
SE = "SentEval/data/downstream"
RAW = "data/downstream/STS"
FOLDERS = {  # local folder -> (repository, folder there); file names are the same on both sides
    **{f"sts/sts{y}": ("leotmc/simcse", f"{SE}/STS/STS{y}-en-test") for y in range(12, 17)},
    "sts/stsb": ("leotmc/simcse", f"{SE}/STS/STSBenchmark"),
    "sts/sick": ("leotmc/simcse", f"{SE}/SICK"),
    "sts_raw/sts12": ("amao0o0/SynWMD", f"{RAW}/STS12-en-test/test-gold"),
    "sts_raw/sts13": ("amao0o0/SynWMD", f"{RAW}/STS13-en-test/test-gs"),
    "sts_raw/sts14": ("amao0o0/SynWMD", f"{RAW}/STS14-en-test/sts-en-test-gs-2014"),
    "sts_raw/sts15": ("amao0o0/SynWMD", f"{RAW}/STS15-en-test/test_evaluation_task2a"),
    "sts_raw/sts16": ("amao0o0/SynWMD", f"{RAW}/STS16-en-test/sts2016-english-with-gs-v1.0"),
    "sts_raw/stsb": ("amao0o0/SynWMD", f"{RAW}/STSBenchmark/stsbenchmark"),
    "sts_raw/sick": ("brmson/dataset-sts", "data/sts/sick2014"),
    **{f"transfer/{t.lower()}": ("robertoviegas/SimCSE", f"{SE}/{t}")
       for t in ("MR", "CR", "SUBJ", "MPQA", "TREC", "MRPC")},
    "transfer/sst2": ("robertoviegas/SimCSE", f"{SE}/SST/binary"),
    "nli/snli_senteval": ("robertoviegas/SimCSE", f"{SE}/SNLI"),
    "icl": ("kongds/scaling_sentemb", ""),
}
FILE_SOURCES = {"sts/sick/readme.txt": ("brmson/dataset-sts", "data/sts/sick2014")}
# The CC BY-SA attribution of STS15 answers-forums ships inside a zip next to the data.
ZIPPED = {"sts/sts15/answers-forums-attribution":
          ("leotmc/simcse", f"{SE}/STS/STS15-en-test/STS.answers-forums.zip", "STS.answers-forums")}
RAW_GITHUB = "https://raw.githubusercontent.com"
NLI_FOR_SIMCSE = ("https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse/resolve/main/"
                  "nli_for_simcse.csv")
SETS = ["sts", "sts_raw", "transfer", "icl", "nli"]
NOT_DOWNLOADED = {  # read by some script, but built here rather than published anywhere
    "dict/wordnet30_word_definitions.tsv.gz":
        "icl.py candidates --source wordnet; derived from Princeton WordNet 3.0 (Debian package "
        "wordnet-base 1:3.0-37, usr/share/wordnet/{index,data}.*), see the shared data's "
        "MANIFEST.md",
    "nli/nli_triplets_partial.csv":
        "train_cse.py's fallback when nli/nli_for_simcse.csv is absent; derived from SNLI "
        "dev/test (nli/snli_senteval) and XNLI-en, see the shared data's README.md",
}

# sha256 and local path of every file, as listed in the shared data's MANIFEST.md, in the
# format of `sha256sum -c` (run in a data folder, it checks that copy)
SHA256 = (HERE / "SHA256SUMS").read_text(encoding="utf-8")


def source(path):
    """(url, member): the raw GitHub URL of a file, or of the zip holding it plus its name
    there."""
    folder, name = path.rsplit("/", 1)
    if folder in ZIPPED:
        repo, zip_path, inner = ZIPPED[folder]
        return f"{RAW_GITHUB}/{repo}/{COMMITS[repo]}/{zip_path}", f"{inner}/{name}"
    repo, remote = FILE_SOURCES.get(path) or FOLDERS[folder]
    within = f"{remote}/{name}" if remote else name
    return f"{RAW_GITHUB}/{repo}/{COMMITS[repo]}/{within}", None


def plan(root, sets):
    """[(path, sha256)] of the checksummed files of `sets` that are missing under root or differ."""
    wanted = [line.split()[::-1] for line in SHA256.strip().splitlines()]
    return [(path, sha) for path, sha in wanted
            if path.split("/")[0] in sets and not _has(root / path, sha)]


def _has(file, sha) -> bool:
    """The file is there with this sha256."""
    return file.is_file() and hashlib.sha256(file.read_bytes()).hexdigest() == sha


_ZIPS = {}  # a zip is fetched once for all its members


def fetch(url, member=None):
    if url not in _ZIPS:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                _ZIPS[url] = response.read()
        except OSError as e:  # offline, DNS failure, HTTP error, timeout
            reason = getattr(e, "reason", e)
            raise UserError(f"cannot download {url} ({reason}): this needs internet access; or "
                            f"copy the data from a machine that has it and point SENTEMB_DATA or "
                            f"--data-dir there") from None
    data = _ZIPS[url] if url.endswith(".zip") else _ZIPS.pop(url)
    return zipfile.ZipFile(io.BytesIO(data)).read(member) if member else data


def write(dest, data):
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic(dest) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        raise UserError(f"cannot write {dest}: {e.strerror}") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=str(HERE),
                   help="target folder (default: the data/ folder of this checkout)")
    p.add_argument("--sets", default=",".join(SETS),
                   help=f"comma-separated subset of {','.join(SETS)} (default: all). nli = SNLI "
                        "dev/test in SentEval form plus SimCSE's 275k training triplets "
                        "(nli_for_simcse.csv)")
    p.add_argument("--list", action="store_true",
                   help="print what would be fetched from where, and fetch nothing")
    args = p.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets or set(sets) - set(SETS):
        raise UserError(f"--sets takes names from {','.join(SETS)}")
    root = pathlib.Path(args.dest).expanduser()
    todo = plan(root, sets)
    # SimCSE's triplets have no published checksum: fetched when absent
    nli = "nli" in sets and not (root / "nli" / "nli_for_simcse.csv").exists()
    if args.list:
        for path, _ in todo:
            print(f"{path}  <-  {' member '.join(filter(None, source(path)))}")
        if nli:
            print(f"nli/nli_for_simcse.csv  <-  {NLI_FOR_SIMCSE}")
        for path, origin in NOT_DOWNLOADED.items():
            print(f"{path}  not downloaded: {origin}")
        return 0
    for path, sha in todo:
        url, member = source(path)
        data = fetch(url, member)
        if hashlib.sha256(data).hexdigest() != sha:
            raise UserError(f"{url} ({path}) does not have the expected sha256 {sha}")
        write(root / path, data)
        print(f"  {path}")
    if nli:
        print("  nli/nli_for_simcse.csv (large, please wait)")
        write(root / "nli" / "nli_for_simcse.csv", fetch(NLI_FOR_SIMCSE))
    derived = ", ".join(NOT_DOWNLOADED)
    print(f"{len(todo) + nli} files downloaded into {root}; not downloaded (derived): {derived} "
          "(`--list` says where they come from)")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main, interrupted="each file downloaded so far is complete; a rerun resumes"))
