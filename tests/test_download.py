"""data/download.py: it plans only missing or changed files, fetches and checks them, fails
offline in one line writing nothing, and its checksums match the shared data."""
import hashlib
import importlib.util
import io
import urllib.error

import pytest
from conftest import ROOT

from support.cli import cli


@pytest.fixture
def dl():
    spec = importlib.util.spec_from_file_location("download", ROOT / "data" / "download.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_plans_only_missing_or_changed_files(dl, tmp_path, monkeypatch):
    (tmp_path / "icl").mkdir()
    (tmp_path / "icl" / "good.txt").write_text("good")
    (tmp_path / "icl" / "bad.txt").write_text("changed")
    sums = {name: sha(name.encode()) for name in ("good", "bad", "new")}
    listing = [f"{sums[n]} icl/{n}.txt" for n in sums] + [f"{sums['new']} sts/x.txt"]
    monkeypatch.setattr(dl, "SHA256", "\n".join(listing))
    want = [("icl/bad.txt", sums["bad"]), ("icl/new.txt", sums["new"])]
    assert dl.plan(tmp_path, ["icl"]) == want


def test_download_writes_checked_files_and_a_rerun_fetches_nothing(dl, tmp_path, capsys,
                                                                   monkeypatch):
    served = {"icl_examples.txt": b"a sentence=>Word\n", "more.txt": b"more\n"}
    listing = [f"{sha(data)} icl/{name}" for name, data in served.items()]
    monkeypatch.setattr(dl, "SHA256", "\n".join(listing))
    urls = []

    def online(url, timeout):
        urls.append(url)
        return io.BytesIO(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(dl.urllib.request, "urlopen", online)
    dest = tmp_path / "d"
    assert cli(dl.main, ["--dest", str(dest), "--sets", "icl"]) == 0
    assert {p.name: p.read_bytes() for p in (dest / "icl").iterdir()} == served
    pinned = "https://raw.githubusercontent.com/kongds/scaling_sentemb/"
    assert all(u.startswith(pinned) for u in urls)
    assert "2 files downloaded into" in capsys.readouterr().out
    assert cli(dl.main, ["--dest", str(dest), "--sets", "icl"]) == 0 and len(urls) == 2
    assert "0 files downloaded into" in capsys.readouterr().out
    (dest / "icl" / "more.txt").write_bytes(b"edited\n")
    served["more.txt"] = b"tampered upstream\n"   # the host now serves other bytes
    assert cli(dl.main, ["--dest", str(dest), "--sets", "icl"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(icl/more.txt) does not have the expected sha256" in err
    assert (dest / "icl" / "more.txt").read_bytes() == b"edited\n"   # nothing replaced


def test_download_offline_fails_in_one_line_and_writes_nothing(dl, tmp_path, capsys,
                                                                monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(dl.urllib.request, "urlopen", offline)
    assert cli(dl.main, ["--dest", str(tmp_path / "d"), "--sets", "icl"]) == 1
    err = capsys.readouterr().err
    want = ("sentemb: error: cannot download "
            "https://raw.githubusercontent.com/kongds/scaling_sentemb/")
    assert err.startswith(want)
    assert err.count("\n") == 1 and "(no network): this needs internet access" in err
    assert not (tmp_path / "d").exists()


def test_download_unknown_set_is_one_line(dl, tmp_path, capsys):
    assert cli(dl.main, ["--dest", str(tmp_path), "--sets", "sts,bogus"]) == 1
    want = f"sentemb: error: --sets takes names from {','.join(dl.SETS)}\n"
    assert capsys.readouterr().err == want


def test_download_list_says_where_everything_comes_from(dl, tmp_path, capsys):
    assert dl.main(["--dest", str(tmp_path), "--list"]) == 0
    out = capsys.readouterr().out
    icl = "icl/icl_examples.txt  <-  https://raw.githubusercontent.com/kongds/scaling_sentemb/"
    assert icl in out
    assert "nli/nli_for_simcse.csv  <-  https://huggingface.co/" in out
    wordnet = ("dict/wordnet30_word_definitions.tsv.gz  not downloaded: "
               "icl.py candidates --source wordnet")
    assert wordnet in out
    assert len(out.splitlines()) == 162 + 1 + len(dl.NOT_DOWNLOADED)


def test_download_script_checksums_match_the_shared_data(dl, data_root):
    rows = [line.split() for line in dl.SHA256.strip().splitlines()]
    assert len(rows) == 162 and {p.split("/")[0] for _, p in rows} == set(dl.SETS)
    for want, path in rows:
        assert sha((data_root / path).read_bytes()) == want, path
        url, member = dl.source(path)
        assert url.startswith("https://raw.githubusercontent.com/")
        assert (member is None) == ("attribution" not in path)
    assert dl.plan(data_root, dl.SETS) == []
