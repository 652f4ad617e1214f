"""Shared by every stage: errors and CLI exits, data folder, atomic writes, hub, flags, provenance, embedding cache."""
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

# A spinning OpenMP thread steals a shared CPU's cores; torch reads this when it loads, so scripts import us first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent
DOWNLOAD_HINT = "run `python data/download.py` or pass --data-dir"


class UserError(ValueError):
    """Something the user can fix (a bad flag, a missing file): one line on stderr, exit 1, no traceback."""


def cli(main, argv=None, interrupted="nothing was written") -> int:
    """main(argv); a UserError or Ctrl-C -> one line on stderr, exit 1. `interrupted`: what a stopped run kept."""
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
    """with atomic(path) as tmp: write a file or folder at tmp; it replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.is_dir() and tmp.is_dir():   # a folder cannot be replaced in one step: move the old aside
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.unlink(missing_ok=True)


def write_atomic(path, text: str) -> None:
    with atomic(path) as tmp:   # the file is complete or absent, never half-written
        tmp.write_text(text, encoding="utf-8")


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
    parts = [[x.strip() for x in v.rpartition("=>")] for v in values]   # [sentence, "=>" or "", word]
    for v, (sentence, sep, word) in zip(values, parts):
        if not (sentence and sep and word):
            raise UserError(f"--demonstration {v!r}: expected \"SENTENCE=>WORD\" or none")
    return [(sentence, word) for sentence, _, word in parts]


def embedder_flags(p):
    """Add the flags that configure embed.Embedder to parser p, with one meaning in every script; unset: None."""
    a = p.add_argument
    a("--template", choices=["eol", "prompt", "none"], help="PromptEOL (default), without 'in one word', or bare")
    a("--pooling", choices=["last", "mean"], help="the last token's state (default) or the prompt's mean")
    a("--demonstration", action="append", metavar="SENTENCE=>WORD",
      help="repeatable, or none (default: the model's in data/demonstrations.json; none with --adapter)")
    a("--adapter", help="LoRA adapter (PEFT format): local directory or hub id")
    a("--max-tokens", type=int, help="cut each sentence to this many tokens (default: no cut, as the paper)")
    a("--batch-size", type=int, default=64, help="sentences per forward pass (default 64)")
    a("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    a("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPUs and bf16 CPUs, else float32")
    a("--bits", type=int, choices=[4, 8], help="quantize the linears but the LM head to 4 or 8 bits (bitsandbytes)")


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
        p.unlink(missing_ok=True)   # another process (a torchrun rank) may have checked the same path
    return p


def git_commit():
    try:  # None outside a git checkout
        run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return run.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(script, argv, started) -> dict:
    """A results record's reproduction facts: commit, command, versions of the libraries loaded, start, duration."""
    modules = {"numpy": "numpy", "scipy": "scipy", "scikit-learn": "sklearn", "torch": "torch",
               "bitsandbytes": "bitsandbytes", "sentence-transformers": "sentence_transformers"}
    libs = {name: sys.modules[m].__version__ for name, m in modules.items() if m in sys.modules}
    return {"git_commit": git_commit(), "command": [script, *(sys.argv[1:] if argv is None else argv)],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_seconds": round(time.time() - started, 1), "versions": {"python": platform.python_version(), **libs}}


def cache_root(cache_dir=None) -> Path:
    return Path(cache_dir or os.environ.get("SENTEMB_CACHE") or "~/.cache/sentemb").expanduser()


def fingerprint(weights, adapter=None, **settings) -> dict:
    """An encoder's identity: settings, weight files' name/size/mtime, adapter weights' sha256 (new ones: new key)."""
    files = sorted(f for f in Path(weights).iterdir() if f.suffix in (".json", ".safetensors", ".bin"))
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    trained = sorted(Path(adapter).glob("adapter_model.*")) if adapter and Path(adapter).is_dir() else []
    trained_sha = hashlib.sha256(b"".join(f.read_bytes() for f in trained)).hexdigest() if trained else None
    return dict(settings, weights=hashlib.sha256(repr(stats).encode()).hexdigest()[:16], adapter=adapter,
                adapter_sha256=trained_sha, version=3)


def fingerprint_key(fingerprint) -> str:
    """sha256 of the canonical JSON of an encoder fingerprint: the cache folder's name."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class CachedEncoder:
    """Encodes only unseen sentences, in chunks, longest first (less padding; an out-of-memory batch fails at once).
    With the encoder's `fingerprint` (read once: wrap no model in training) it keeps every vector in cache_root()/
    embeddings/<fingerprint_key>/: fingerprint.json (fingerprint, dim); vectors.bin (sha256(sentence) + f32[dim])."""

    def __init__(self, encoder, cache_dir=None, disk=True, chunk_size=512):
        self.encoder, self.chunk_size, self.n_encoded = encoder, chunk_size, 0  # n_encoded: sentences encoded
        self.fingerprint = getattr(encoder, "fingerprint", None)
        self.dir, self.dim, self.vectors = None, None, {}  # vectors: sha256 digest -> float32[dim]
        if disk and self.fingerprint is not None:
            self.dir = cache_root(cache_dir) / "embeddings" / fingerprint_key(self.fingerprint)
            if (self.dir / "vectors.bin").exists():
                self.dim = json.loads((self.dir / "fingerprint.json").read_text())["dim"]
                raw = np.fromfile(self.dir / "vectors.bin", dtype=np.uint8)
                size = 32 + 4 * self.dim
                raw = raw[: len(raw) // size * size].reshape(-1, size)   # drops a killed run's partial record
                self.vectors = dict(zip((r.tobytes() for r in raw[:, :32]), raw[:, 32:].copy().view("<f4")))

    def _append(self, keys, vecs):
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "fingerprint.json"
        if not meta.exists():  # written before any vector
            write_atomic(meta, json.dumps({"fingerprint": self.fingerprint, "dim": self.dim}, indent=1, default=str))
        with open(self.dir / "vectors.bin", "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)   # parallel runs share the cache
            end = os.fstat(f.fileno()).st_size
            f.truncate(end - end % (32 + 4 * self.dim))   # cuts off a record an interrupted run left short
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
        return np.stack([self.vectors[k] for k in keys]) if keys else np.zeros((0, self.dim or 0), np.float32)
