"""support/cache.py: CachedEncoder encodes each sentence once and keeps its vector on disk under
the encoder's fingerprint; a record cut short is dropped; the fingerprint follows what changes
the vectors."""
import json
import re

import numpy as np
import pytest

from support.cache import DIGEST, CachedEncoder, fingerprint, fingerprint_key


class ToyEncoder:
    """Sentence "a<i>" or "b<i>" -> a 2-d vector from i; records what it was asked to encode."""

    def __init__(self, fingerprint=None):
        self.calls = 0
        self.seen = []
        if fingerprint is not None:
            self.fingerprint = fingerprint

    def encode(self, sentences):
        self.calls += 1
        self.seen += list(sentences)
        angles = [int(s[1:]) / 10 + (s[0] == "b") for s in sentences]
        return np.array([[np.cos(a), np.sin(a)] for a in angles], np.float32)


def test_cache_returns_identical_vectors_and_skips_encoded_sentences(tmp_path):
    enc = ToyEncoder(fingerprint={"model": "toy", "demonstrations": [["s", "w"]]})
    first = CachedEncoder(enc, cache_dir=tmp_path, chunk_size=2)
    v1 = first.encode(["a1", "b2", "a1", "b3"])
    assert first.n_encoded == 3 and sorted(enc.seen) == ["a1", "b2", "b3"]
    assert enc.calls == 2                          # 3 new sentences in chunks of 2
    assert np.array_equal(v1, enc.encode(["a1", "b2", "a1", "b3"]))
    again = CachedEncoder(enc, cache_dir=tmp_path)  # a new run reads the store
    enc.seen = []
    v2 = again.encode(["b3", "a1", "b2", "b4"])
    assert enc.seen == ["b4"] and again.n_encoded == 1
    assert np.array_equal(v2[:3], v1[[3, 0, 1]]) and v2.dtype == np.float32
    folder = tmp_path / "embeddings" / fingerprint_key(enc.fingerprint)
    meta = json.loads((folder / "fingerprint.json").read_text())
    assert meta == {"fingerprint": enc.fingerprint, "dim": 2}
    other = ToyEncoder(fingerprint={"model": "toy", "demonstrations": []})
    assert CachedEncoder(other, cache_dir=tmp_path).vectors == {}


def test_the_encoder_expects_only_the_sentences_not_in_the_cache(tmp_path):
    """An Embedder decides to compile from `expect`: sentences found in the cache don't count."""
    enc = ToyEncoder(fingerprint={"model": "toy"})
    enc.expected = []
    enc.expect = enc.expected.append
    CachedEncoder(enc, cache_dir=tmp_path, chunk_size=2).encode(["a1", "a2", "a1", "a3"])
    CachedEncoder(enc, cache_dir=tmp_path, chunk_size=2).encode(["a1", "a2", "a3", "b1"])
    CachedEncoder(enc, cache_dir=tmp_path).encode(["a1"])
    assert enc.expected == [3, 1]                 # all 3 new, then b1; nothing when all are found


def test_cache_survives_a_record_cut_short(tmp_path):
    enc = ToyEncoder(fingerprint={"model": "toy"})
    CachedEncoder(enc, cache_dir=tmp_path).encode(["a0", "b1"])
    store = next((tmp_path / "embeddings").iterdir()) / "vectors.bin"
    with open(store, "ab") as f:
        f.write(b"\x01" * 17)  # an interrupted append
    cached = CachedEncoder(enc, cache_dir=tmp_path)
    assert len(cached.vectors) == 2
    cached.encode(["b2"])
    assert store.stat().st_size == 3 * (DIGEST + 4 * 2)
    reread = CachedEncoder(enc, cache_dir=tmp_path).encode(["b2", "a0"])
    assert np.array_equal(reread, enc.encode(["b2", "a0"]))


def test_encoder_without_fingerprint_is_not_cached_on_disk(tmp_path):
    enc = ToyEncoder()
    cached = CachedEncoder(enc, cache_dir=tmp_path)
    cached.encode(["a0", "b1"])
    cached.encode(["a0"])  # remembered in memory
    assert cached.dir is None and enc.calls == 1 and not any(tmp_path.iterdir())


def test_no_sentences_give_an_empty_array(tmp_path):
    cached = CachedEncoder(ToyEncoder(fingerprint={"model": "toy"}), cache_dir=tmp_path)
    assert cached.encode([]).shape == (0, 0)


def test_a_wrong_shape_from_the_encoder_names_the_cache(tmp_path):
    enc = ToyEncoder(fingerprint={"model": "toy"})
    cached = CachedEncoder(enc, cache_dir=tmp_path)
    cached.encode(["a0"])
    enc.encode = lambda sentences: np.zeros((len(sentences), 3), np.float32)
    want = (f"encoder returned shape (1, 3) for 1 sentences; expected [n, 2] "
            f"(a stale cache? remove {cached.dir})")
    with pytest.raises(RuntimeError, match=f"^{re.escape(want)}$"):
        cached.encode(["a1"])


def test_fingerprint_follows_settings_weights_and_adapter(tmp_path):
    weights = tmp_path / "model"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    (weights / "model.safetensors").write_bytes(b"w" * 10)
    (weights / "README.md").write_text("not a weight file")
    base = fingerprint(weights, template="eol")
    assert base["template"] == "eol" and base["adapter_sha256"] is None
    assert fingerprint(weights, template="eol") == base
    assert fingerprint(weights, template="none") != base
    (weights / "README.md").write_text("edited: no vector changes")
    assert fingerprint(weights, template="eol") == base
    (weights / "model.safetensors").write_bytes(b"w" * 11)
    changed = fingerprint(weights, template="eol")
    assert changed["weights"] != base["weights"]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"a")
    trained = fingerprint(weights, adapter=str(adapter), template="eol")
    (adapter / "adapter_model.safetensors").write_bytes(b"b")   # retrained in place
    retrained = fingerprint(weights, adapter=str(adapter), template="eol")
    assert trained["adapter_sha256"] is not None
    assert trained["adapter_sha256"] != retrained["adapter_sha256"]
    assert fingerprint_key(trained) != fingerprint_key(retrained)
    assert fingerprint_key(trained) == fingerprint_key(dict(reversed(list(trained.items()))))
