import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import DataConfig
from data_pipeline.sources import EmbeddedCorpus, HFDataset, LocalFiles, build_source
from launch.cli import main


def _fake_stdlib(root):
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "pkg" / "tests").mkdir()
    (root / "b.py").write_text("b = 2\n")
    (root / "a.py").write_text("a = 1\n")
    (root / "empty.py").write_text("")
    (root / "latin.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    (root / "pkg" / "mod.py").write_text("m = 3\n" * 10)
    (root / "test" / "test_a.py").write_text("assert 1\n")
    (root / "pkg" / "tests" / "t.py").write_text("assert 2\n")
    (root / "notes.txt").write_text("not python\n")


def test_embedded_sorted_without_tests_counts_skips_and_budget(tmp_path):
    _fake_stdlib(tmp_path / "lib")
    corpus = EmbeddedCorpus(stdlib_root=str(tmp_path / "lib"), include_docs=False)
    names = [os.path.relpath(p, tmp_path / "lib") for p in corpus.files]
    assert names == ["a.py", "b.py", "pkg/mod.py"]
    assert corpus.skipped == {"empty": 1, "non_utf8": 1, "over_budget": 0}
    assert list(corpus.documents()) == ["a = 1\n", "b = 2\n", "m = 3\n" * 10]
    # Files that would overflow the budget are skipped by size, before being read.
    small = EmbeddedCorpus(stdlib_root=str(tmp_path / "lib"), include_docs=False, max_bytes=13)
    assert [os.path.basename(p) for p in small.files] == ["a.py", "b.py"]
    assert small.skipped == {"empty": 1, "non_utf8": 0, "over_budget": 2} and small.total_bytes == 12


def test_embedded_adds_prose_deduplicated_by_realpath(tmp_path):
    _fake_stdlib(tmp_path / "lib")
    docs = tmp_path / "doc" / "python3.11" / "html" / "_sources"
    (docs / "library").mkdir(parents=True)
    (docs / "library" / "os.rst.txt").write_text("The os module\n=============\n")
    (tmp_path / "doc" / "python3").mkdir()
    os.symlink(tmp_path / "doc" / "python3.11" / "html", tmp_path / "doc" / "python3" / "html")
    roots = [str(docs), str(tmp_path / "doc" / "python3" / "html" / "_sources")]
    corpus = EmbeddedCorpus(stdlib_root=str(tmp_path / "lib"), docs_roots=roots)
    prose = [p for p in corpus.files if p.endswith(".txt")]
    assert len(prose) == 1 and list(corpus.documents())[-1].startswith("The os module")


def test_real_stdlib_is_found_and_deterministic():
    corpus = EmbeddedCorpus(max_bytes=200_000, include_docs=False)
    assert corpus.files and corpus.total_bytes <= 200_000
    assert not any(f"{os.sep}test{os.sep}" in p for p in corpus.files)
    assert corpus.files == EmbeddedCorpus(max_bytes=200_000, include_docs=False).files
    assert corpus.fingerprint() == EmbeddedCorpus(max_bytes=200_000, include_docs=False).fingerprint()


def _write_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "one.txt").write_text("first document\n")
    (tmp_path / "d" / "two.jsonl").write_text(
        json.dumps({"content": "second", "id": 1}) + "\n\n" + json.dumps({"content": "third"}) + "\n")
    pq.write_table(pa.table({"content": ["fourth", "", "fifth"]}), tmp_path / "d" / "three.parquet")


def test_local_files_txt_jsonl_parquet_with_custom_field(tmp_path):
    _write_files(tmp_path)
    source = LocalFiles(str(tmp_path / "d"), text_field="content")
    # Sorted file order (one.txt, three.parquet, two.jsonl); empty rows and blank lines dropped.
    assert list(source.documents()) == ["first document\n", "fourth", "fifth", "second", "third"]
    globbed = LocalFiles(str(tmp_path / "d" / "*.jsonl") + "," + str(tmp_path / "d" / "one.txt"),
                         text_field="content")
    assert list(globbed.documents()) == ["second", "third", "first document\n"]


def test_rank_documents_are_disjoint_and_cover(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(11)))
    source = LocalFiles(str(path))
    shares = [list(source.rank_documents(r, 3)) for r in range(3)]
    assert sorted(sum(shares, [])) == sorted(source.documents())
    assert len(set(sum(shares, []))) == 11


def test_hf_streaming_source_on_local_files(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(10)))
    cfg = DataConfig(source="hf:json", hf_data_files=[str(path)], text_field="body")
    source = build_source(cfg)
    assert isinstance(source, HFDataset)
    assert list(source.documents()) == [f"doc {i}" for i in range(10)]
    shares = [list(source.rank_documents(r, 2)) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(f"doc {i}" for i in range(10))
    assert not set(shares[0]) & set(shares[1])
    with pytest.raises(ValueError, match="example 0: no 'text' field"):
        list(build_source(DataConfig(source="hf:json", hf_data_files=[str(path)])).documents())


def test_missing_path_and_empty_glob_are_named(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="'/definitely/missing.jsonl' does not exist"):
        LocalFiles("/definitely/missing.jsonl")
    with pytest.raises(FileNotFoundError, match=r"glob '.*\*\.parquet' matched no files"):
        LocalFiles(str(tmp_path / "*.parquet"))
    assert main(["data", "prepare", "--source", str(tmp_path / "nothing*.txt"), "--cache-dir",
                 str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ebt data: error: data source glob") and "\n" not in err
    assert not (tmp_path / "c").exists()


def test_jsonl_without_field_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"txt": "typo"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no 'text' field"):
        list(LocalFiles(str(path)).documents())
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p\.parquet: no 'text' column"):
        list(LocalFiles(str(tmp_path / "p.parquet")).documents())


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl:2: not UTF-8"):
        list(LocalFiles(str(bad)).documents())
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: invalid JSON"):
        list(LocalFiles(str(broken)).documents())
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(ValueError, match=r"fake\.parquet: not a readable parquet file"):
        list(LocalFiles(str(fake)).documents())
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.md': unsupported type"):
        LocalFiles(str(tmp_path / "notes.md"))


def test_unreachable_dataset_is_one_line(monkeypatch):
    import datasets

    def offline(*_args, **_kwargs):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (OfflineModeIsEnabled)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"^dataset 'org/name' could not be opened: ConnectionError: .*Hub[^\n]*$"):
        list(build_source(DataConfig(source="hf:org/name")).documents())
