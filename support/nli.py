"""Used by train_cse: SimCSE's NLI triplet files (sent0, sent1, hard_neg), read and checked."""
import csv
import hashlib
import io
import sys
from pathlib import Path

from support.cli import UserError, data_dir

COLUMNS = ("sent0", "sent1", "hard_neg")            # SimCSE's nli_for_simcse.csv header


def read_triplets(path) -> tuple[list, list, str]:
    """SimCSE csv -> (triplets, lines of the rows skipped (bad field count, empty field), sha)."""
    try:
        raw = Path(path).read_bytes()
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"no such file: {path} (run `python data/download.py --sets nli`, or "
                        "pass --data)") from None
    except UnicodeDecodeError as e:                            # (10: the newline byte)
        raise UserError(f"{path}:{raw.count(10, 0, e.start) + 1}: not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    triplets, bad = [], []                                     # the rows kept, the rows skipped
    try:
        header = [h.strip() for h in next(reader, [])]
        if not set(COLUMNS) <= set(header):
            raise UserError(f"{path}: the header is {','.join(header) or 'empty'}; "
                            f"expected {','.join(COLUMNS)}")
        cols = [header.index(c) for c in COLUMNS]
        for row in reader:
            if row and (len(row) != len(header) or not all(row[c].strip() for c in cols)):
                bad.append(reader.line_num)                    # (the row's last line)
            elif row:                                          # (blank lines are not rows)
                triplets.append(tuple(row[c] for c in cols))
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed csv ({e})") from None
    if not triplets:
        raise UserError(f"{path}: no valid triplet ({len(bad)} malformed rows)")
    return triplets, bad, hashlib.sha256(raw).hexdigest()


def default_files(data=None) -> list[str]:
    """SimCSE's full file if downloaded, else every partial triplet file of <data>/nli/, by name."""
    nli = data_dir(data, need="nli") / "nli"
    full = nli / "nli_for_simcse.csv"
    if full.exists():
        return [str(full)]
    partial = sorted(nli.glob("nli_triplets_*.csv")) or [nli / "nli_triplets_partial.csv"]
    return [str(f) for f in partial]


def read_files(paths, say=True) -> tuple[list, list]:
    """-> (the files' triplets in turn, [{path, sha256, triplets, malformed_lines}]); `say`: one
    line a file on stderr (the run's first lines)."""
    triplets, files = [], []
    for path in paths:
        rows, bad, sha = read_triplets(path)
        triplets += rows
        files.append({"path": path, "sha256": sha, "triplets": len(rows), "malformed_lines": bad})
        skipped = f", skipped {len(bad)} malformed row(s), line(s) {str(bad[:20])[1:-1]}"
        if say:
            print(f"{path}: {len(rows)} triplets{skipped * bool(bad)}", file=sys.stderr)
    return triplets, files
