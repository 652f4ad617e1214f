"""What every stage shares: the one error type and the one way a CLI ends, the data folder, atomic
writes, the hub, the --demonstration, --device and --output checks, a record's provenance, and the
on-disk embedding cache."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# A spinning OpenMP thread steals the cores of a shared CPU: wait passively unless the user chose otherwise.
# (Read when torch loads: every script imports this module before torch.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent
DOWNLOAD_HINT = "run `python data/download.py` or pass --data-dir"


class UserError(ValueError):
    """Something the user can fix (a bad flag, a missing file): one line on stderr, exit 1, no traceback."""


def cli(main, argv=None, interrupted="nothing was written") -> int:
    """Run main(argv) for a script: a UserError or Ctrl-C ends in one line on stderr and exit status 1.
    `interrupted` (a string, or a function returning one) says what an interrupted run kept."""
    prog = Path(sys.argv[0]).name if argv is None else "sentemb"
    try:
        return main(argv) or 0
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted() if callable(interrupted) else interrupted}", file=sys.stderr)
    return 1


def data_dir(arg=None, need="sts") -> Path:
    """--data-dir if given, else $SENTEMB_DATA, else <repo>/data; it must contain the folder `need`."""
    path = Path(arg or os.environ.get("SENTEMB_DATA") or REPO / "data").expanduser()
    if not (path / need).exists():
        raise UserError(f"no evaluation data in {path} (no {need}/ folder there): {DOWNLOAD_HINT}")
    return path


@contextlib.contextmanager
def atomic(path):
    """with atomic(path) as tmp: write a file or a folder at tmp; it replaces `path` only if the block
    succeeds, so an error or Ctrl-C never leaves a half-written output."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():        # a folder cannot be replaced in one step: move the old aside
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def hub_snapshot(repo: str, patterns: list[str], what: str = "model") -> Path:
    """Download the files of a Hugging Face Hub repo matching `patterns` -> the local folder."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or repo.startswith((".", "/")):
        raise UserError(f"{what} {repo!r} is neither a local directory nor a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:   # offline, unknown or gated repo
        msg = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"could not fetch {what} {repo!r} from the Hugging Face Hub ({type(e).__name__}: {msg}); "
                        f"without network pass a local directory") from None


def parse_demonstrations(values):
    """--demonstration values -> None (flag absent: the model's default), [] ('none'), or [(sentence, word)]."""
    if values is None:
        return None
    if [v.strip().lower() for v in values] == ["none"]:
        return []
    demos = []
    for v in values:
        sentence, sep, word = v.rpartition("=>")
        if not sep or not sentence.strip() or not word.strip():
            raise UserError(f"--demonstration {v!r}: expected \"SENTENCE=>WORD\" or none")
        demos.append((sentence.strip(), word.strip()))
    return demos


def embedder_flags(p):
    """Add the flags that configure embed.Embedder to parser p, with one meaning in every script; unset: None."""
    a = p.add_argument
    a("--template", choices=["eol", "prompt", "none"],
      help="eol: PromptEOL (default, the paper's); prompt: no 'in one word'; none: the bare sentence")
    a("--pooling", choices=["last", "mean"], help="the last token's state (default) or the prompt's mean")
    a("--demonstration", action="append", metavar="SENTENCE=>WORD",
      help="repeatable, or none (default: the model's in data/demonstrations.json; none with --adapter)")
    a("--adapter", help="LoRA adapter (PEFT format): local directory or hub id")
    a("--max-tokens", type=int, help="cut each sentence to this many tokens (default: no cut, as the paper)")
    a("--batch-size", type=int, default=64, help="sentences per forward pass (default 64)")
    a("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    a("--dtype", choices=["float32", "bfloat16", "float16"], help="precision (default: bfloat16 on GPUs)")
    a("--bits", type=int, choices=[4, 8], help="quantize the decoder blocks' linears to 4 or 8 bits (bitsandbytes)")


def device(name=None):
    """--device value -> torch.device; None: cuda if available, else cpu."""
    import torch
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this torch has no CUDA device ({torch.__version__}); use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return dev


def writable(flag, path) -> Path:
    """Fail before any work if `path`, the value of `flag`, cannot be written: a folder, no folder, no permission."""
    p = Path(path)
    if p.is_dir() or not p.parent.is_dir():
        raise UserError(f"{flag} {path}: {'is a directory' if p.is_dir() else 'its folder does not exist'}")
    existed = p.exists()
    try:  # the real test: permissions, a read-only file system, root on /proc
        p.open("a").close()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror})") from None
    if not existed:
        p.unlink()
    return p


def git_commit():
    try:  # None outside a git checkout
        run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return run.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


VERSIONED = {"numpy": "numpy", "scipy": "scipy", "scikit-learn": "sklearn", "torch": "torch",
             "bitsandbytes": "bitsandbytes", "sentence-transformers": "sentence_transformers"}


def provenance(script, argv, started) -> dict:
    """A results record's reproduction facts: commit, command, versions of the libraries loaded, start, duration."""
    loaded = {name: sys.modules[m].__version__ for name, m in VERSIONED.items() if m in sys.modules}
    return {"git_commit": git_commit(), "command": [script, *(sys.argv[1:] if argv is None else argv)],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_seconds": round(time.time() - started, 1),
            "versions": {"python": platform.python_version(), **loaded}}


# ----------------------------------------------------------------------------- the embedding cache
def files_id(folder, suffixes=(".json", ".safetensors", ".bin")) -> str:
    """Cheap identity of a folder's files (name, size, mtime): new weights at an old path are a new encoder."""
    files = sorted(f for f in Path(folder).iterdir() if f.suffix in suffixes)
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:16]


def content_id(folder, pattern="adapter_model.*"):
    """sha256 of the files matching `pattern` (an adapter's weights): a retrained adapter is a new encoder."""
    files = sorted(Path(folder).glob(pattern)) if folder and Path(folder).is_dir() else []
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest() if files else None


def fingerprint(weights, adapter=None, **settings) -> dict:
    """An encoder's identity, which keys its cache: its settings, the weight files' identity and the adapter's
    content, so new weights or a retrained adapter at an old path make a new encoder."""
    return dict(settings, weights=files_id(weights), adapter=adapter, adapter_sha256=content_id(adapter), version=2)


def fingerprint_key(fingerprint) -> str:
    """sha256 of the canonical JSON of an encoder fingerprint: the cache folder's name."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class CachedEncoder:
    """Wraps an encoder: encodes only sentences it has not seen, in chunks, longest first (less padding; an
    out-of-memory batch fails at once), and, if the encoder has a `fingerprint`, keeps every vector in
    <$SENTEMB_CACHE or ~/.cache/sentemb>/embeddings/<fingerprint_key>/:
      fingerprint.json  the fingerprint and the vector size, for humans;
      vectors.bin       append-only records: sha256(sentence) (32 bytes) + float32[dim].
    A killed run leaves at most a partial last record, which readers ignore and the next append cuts off; appends hold
    an flock, so parallel runs can share a cache. The fingerprint is read once: do not wrap a model being trained.
    `n_encoded` counts sentences actually encoded."""

    def __init__(self, encoder, cache_dir=None, disk=True, chunk_size=512):
        self.encoder, self.chunk_size, self.n_encoded = encoder, chunk_size, 0
        self.fingerprint = getattr(encoder, "fingerprint", None)
        self.dir, self.dim, self.vectors = None, None, {}  # vectors: sha256 digest -> float32[dim]
        if disk and self.fingerprint is not None:
            root = Path(cache_dir or os.environ.get("SENTEMB_CACHE") or "~/.cache/sentemb")
            self.dir = root.expanduser() / "embeddings" / fingerprint_key(self.fingerprint)
            if (self.dir / "vectors.bin").exists():
                self.dim = json.loads((self.dir / "fingerprint.json").read_text())["dim"]
                raw = np.fromfile(self.dir / "vectors.bin", dtype=np.uint8)
                size = 32 + 4 * self.dim
                raw = raw[: len(raw) // size * size].reshape(-1, size)
                self.vectors = dict(zip((r.tobytes() for r in raw[:, :32]), raw[:, 32:].copy().view("<f4")))

    def _append(self, keys, vecs):
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "fingerprint.json"
        if not meta.exists():  # written before any vector
            with atomic(meta) as tmp:
                tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "dim": self.dim}, indent=1, default=str))
        size = 32 + 4 * self.dim
        with open(self.dir / "vectors.bin", "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            end = os.fstat(f.fileno()).st_size
            if end % size:  # a record cut short by an interrupted run
                f.truncate(end - end % size)
            f.write(b"".join(k + v.astype("<f4").tobytes() for k, v in zip(keys, vecs)))

    def encode(self, sentences, progress=False) -> np.ndarray:
        from tqdm import tqdm
        keys = [hashlib.sha256(s.encode()).digest() for s in sentences]
        new = {k: s for k, s in zip(keys, sentences) if k not in self.vectors}
        todo = sorted(new.items(), key=lambda kv: -len(kv[1]))
        with tqdm(total=len(todo), desc="encoding", unit="sent", disable=not (progress and todo)) as bar:
            for i in range(0, len(todo), self.chunk_size):
                chunk = todo[i:i + self.chunk_size]
                vecs = np.asarray(self.encoder.encode([s for _, s in chunk]), dtype=np.float32)
                if vecs.ndim != 2 or len(vecs) != len(chunk) or vecs.shape[1] != (self.dim or vecs.shape[1]):
                    raise RuntimeError(f"encoder returned shape {vecs.shape} for {len(chunk)} sentences; "
                                       f"expected [n, {self.dim or 'd'}] (a stale cache? remove {self.dir})")
                self.dim = vecs.shape[1]
                if self.dir is not None:
                    self._append([k for k, _ in chunk], vecs)
                self.vectors.update(zip((k for k, _ in chunk), vecs))
                self.n_encoded += len(chunk)
                bar.update(len(chunk))
        if not keys:
            return np.zeros((0, self.dim or 0), np.float32)
        return np.stack([self.vectors[k] for k in keys])
