"""Used by embed, evaluate and icl: an encoder's fingerprint, and a disk cache of its vectors.

embed.Embedder computes its fingerprint; evaluate and icl keep its vectors in the cache."""
import fcntl
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from support.files import cache_root, write_atomic

DIGEST = 32   # sha256 of a sentence: the key of its vector


def fingerprint(weights, adapter=None, **settings) -> dict:
    """An encoder's identity: its settings, the weight files' name/size/mtime, the adapter's
    sha256."""
    kinds = (".json", ".safetensors", ".bin")
    files = sorted(f for f in Path(weights).iterdir() if f.suffix in kinds)
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    trained = []
    if adapter and Path(adapter).is_dir():
        trained = sorted(Path(adapter).glob("adapter_model.*"))
    trained_sha = None
    if trained:
        trained_sha = hashlib.sha256(b"".join(f.read_bytes() for f in trained)).hexdigest()
    weights_sha = hashlib.sha256(repr(stats).encode()).hexdigest()[:16]
    return dict(settings, weights=weights_sha, adapter=adapter, adapter_sha256=trained_sha,
                version=3)


def fingerprint_key(fingerprint) -> str:
    """sha256 of the canonical JSON of an encoder fingerprint: the cache folder's name."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class CachedEncoder:
    """Encodes only unseen sentences, in chunks, longest first (less padding; an out-of-memory
    batch fails at once). With the encoder's `fingerprint` (read once: wrap no model in training)
    it keeps every vector in cache_root()/embeddings/<fingerprint_key>/: fingerprint.json
    (fingerprint, dim) and vectors.bin, records of sha256(sentence) + float32[dim]."""

    def __init__(self, encoder, cache_dir=None, disk=True, chunk_size=512):
        self.encoder = encoder
        self.chunk_size = chunk_size
        self.n_encoded = 0                   # sentences encoded (not found in the cache)
        self.fingerprint = getattr(encoder, "fingerprint", None)
        self.dir = None
        self.dim = None
        self.vectors = {}                    # sha256 digest -> float32[dim]
        if disk and self.fingerprint is not None:
            self.dir = cache_root(cache_dir) / "embeddings" / fingerprint_key(self.fingerprint)
            if (self.dir / "vectors.bin").exists():
                self._read()

    def _read(self):
        self.dim = json.loads((self.dir / "fingerprint.json").read_text())["dim"]
        raw = np.fromfile(self.dir / "vectors.bin", dtype=np.uint8)
        size = DIGEST + 4 * self.dim
        # A killed run may have left a partial record at the end: drop it.
        raw = raw[: len(raw) // size * size].reshape(-1, size)
        keys = [r.tobytes() for r in raw[:, :DIGEST]]
        vectors = raw[:, DIGEST:].copy().view("<f4")   # (N, dim)
        self.vectors = dict(zip(keys, vectors, strict=True))

    def _append(self, keys, vecs):
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "fingerprint.json"
        if not meta.exists():  # written before any vector
            about = {"fingerprint": self.fingerprint, "dim": self.dim}
            write_atomic(meta, json.dumps(about, indent=1, default=str))
        records = b"".join(k + v.astype("<f4").tobytes() for k, v in zip(keys, vecs, strict=True))
        with open(self.dir / "vectors.bin", "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)   # parallel runs share the cache
            end = os.fstat(f.fileno()).st_size
            # Cut a record that an interrupted run left short.
            f.truncate(end - end % (DIGEST + 4 * self.dim))
            f.write(records)

    def encode(self, sentences, progress=False) -> np.ndarray:
        from tqdm import tqdm
        keys = [hashlib.sha256(s.encode()).digest() for s in sentences]
        new = {k: s for k, s in zip(keys, sentences, strict=True) if k not in self.vectors}
        todo = sorted(new.items(), key=lambda kv: -len(kv[1]))
        if todo and hasattr(self.encoder, "expect"):   # an Embedder compiles if they repay it
            self.encoder.expect(len(todo))
        quiet = not (progress and todo)
        with tqdm(total=len(todo), desc="encoding", unit="sent", disable=quiet) as bar:
            for i in range(0, len(todo), self.chunk_size):
                chunk = todo[i:i + self.chunk_size]
                self._encode_chunk(chunk)
                bar.update(len(chunk))
        if not keys:
            return np.zeros((0, self.dim or 0), np.float32)
        return np.stack([self.vectors[k] for k in keys])

    def _encode_chunk(self, chunk):
        """chunk: [(key, sentence)] -> their vectors, in memory and on disk."""
        vecs = np.asarray(self.encoder.encode([s for _, s in chunk]), dtype=np.float32)
        fits = vecs.ndim == 2 and len(vecs) == len(chunk)
        if fits and self.dim is not None:
            fits = vecs.shape[1] == self.dim
        if not fits:
            raise RuntimeError(f"encoder returned shape {vecs.shape} for {len(chunk)} sentences; "
                               f"expected [n, {self.dim or 'd'}] "
                               f"(a stale cache? remove {self.dir})")
        self.dim = vecs.shape[1]
        keys = [k for k, _ in chunk]
        if self.dir is not None:
            self._append(keys, vecs)
        self.vectors.update(zip(keys, vecs, strict=True))
        self.n_encoded += len(chunk)
