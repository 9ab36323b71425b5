"""Document sources behind one interface.

A source yields documents (str) in a deterministic order, can restrict itself to one rank's share, and
describes itself cheaply (`fingerprint`) so that tokenizers and shards can be keyed by their inputs without
reading everything again.

Three kinds:
- `EmbeddedCorpus`: the running interpreter's stdlib `.py` files (every machine has them) plus Debian's
  python3-doc reST prose when installed.
- `LocalFiles`: `.txt` (one document per file), `.jsonl` (one per line, configurable field) and `.parquet`
  (one per row) files, given as paths, directories or globs.
- `HFDataset`: anything `datasets.load_dataset(..., streaming=True)` can open, Hub names included.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fsutil import iter_jsonl_lines

from .config import DataConfig

# Folders of the stdlib that are tests or third-party code, not the library itself.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
# Where Debian's python3-doc (python3.X-doc) puts the reST sources of the HTML docs.
DEFAULT_DOCS_GLOBS = ("/usr/share/doc/python3*/html/_sources",)
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")


class Source:
    """Interface: deterministic document stream plus a cheap identity."""

    name: str = "source"

    def documents(self) -> Iterator[str]:
        raise NotImplementedError

    def rank_documents(self, rank: int, world_size: int) -> Iterator[str]:
        """This rank's share: documents whose index is congruent to rank (disjoint, covers all)."""
        return itertools.islice(self.documents(), rank, None, world_size)

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        blob = json.dumps(self.describe(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _stat_key(path: str) -> list[Any]:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


@dataclass
class EmbeddedCorpus(Source):
    """Stdlib `.py` sources in sorted order, then python3-doc prose, filling a byte budget in that order.

    Empty (whitespace-only) and non-UTF-8 files are skipped and counted in `skipped`.
    """

    max_bytes: int | None = None
    include_docs: bool = True
    stdlib_root: str | None = None
    docs_roots: list[str] | None = None
    files: list[str] = field(default_factory=list, init=False)
    skipped: dict[str, int] = field(default_factory=dict, init=False)
    name: str = "embedded"

    def __post_init__(self) -> None:
        root = self.stdlib_root or sysconfig.get_paths()["stdlib"]
        if not os.path.isdir(root):
            raise FileNotFoundError(f"stdlib directory {root!r} does not exist")
        candidates = _walk_sorted(root, (".py",), skip_dirs=_STDLIB_SKIP_DIRS)
        if self.include_docs:
            candidates += self._doc_files()
        self.skipped = {"empty": 0, "non_utf8": 0, "over_budget": 0}
        seen: set[str] = set()
        used = 0
        for path in candidates:
            real = os.path.realpath(path)
            if real in seen:  # python3-doc has symlinked html dirs: the same file under several names
                continue
            seen.add(real)
            size = os.path.getsize(path)
            if self.max_bytes is not None and used + size > self.max_bytes:
                # Checked before reading, so a small budget's source is cheap to build; smaller files later
                # in the order may still fit (the budget is filled greedily, order kept).
                self.skipped["over_budget"] += 1
                continue
            with open(path, "rb") as handle:
                data = handle.read()
            if not data.strip():
                self.skipped["empty"] += 1
                continue
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self.skipped["non_utf8"] += 1
                continue
            used += len(data)
            self.files.append(path)
        self.total_bytes = used

    def _doc_files(self) -> list[str]:
        roots: list[str] = []
        if self.docs_roots is not None:
            roots = list(self.docs_roots)
        else:
            for pattern in DEFAULT_DOCS_GLOBS:
                roots += sorted(glob.glob(pattern))
        files: list[str] = []
        for root in roots:
            if os.path.isdir(root):
                files += _walk_sorted(root, (".txt", ".rst"), skip_dirs=set())
        return files

    def documents(self) -> Iterator[str]:
        for path in self.files:
            with open(path, encoding="utf-8") as handle:
                yield handle.read()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "embedded",
            "files": [_stat_key(p) for p in self.files],
            "skipped": dict(self.skipped),
        }

    def summary(self) -> dict[str, Any]:
        """Small human-readable description for manifests (the full file list lives in the fingerprint)."""
        return {"kind": "embedded", "files": len(self.files), "bytes": self.total_bytes, "skipped": self.skipped}


def _walk_sorted(root: str, suffixes: tuple[str, ...], skip_dirs: set[str]) -> list[str]:
    """Files under `root` in sorted order, following directory symlinks but entering each real directory once
    (a symlink back up the tree would otherwise recurse forever)."""
    out: list[str] = []
    entered: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in entered:
            dirnames[:] = []
            continue
        entered.add(real)
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(suffixes)]
    return out


def unique_real_paths(paths: list[str]) -> list[str]:
    """`paths` without the ones that name a file already listed under another name (symlinks, `..`): the first
    name of each real file is kept, in order."""
    seen: set[str] = set()
    out: list[str] = []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            out.append(path)
    return out


def expand_paths(spec: str) -> list[str]:
    """Comma-separated paths, directories and globs -> sorted unique file list; errors name the bad entry."""
    files: list[str] = []
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        if glob.has_magic(entry):
            matched = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
            if not matched:
                raise FileNotFoundError(f"data source glob {entry!r} matched no files")
            files += matched
        elif os.path.isdir(entry):
            matched = _walk_sorted(entry, SUPPORTED_SUFFIXES, skip_dirs=set())
            if not matched:
                raise FileNotFoundError(f"data source directory {entry!r} holds no .txt/.jsonl/.parquet files")
            files += matched
        elif os.path.exists(entry):
            files.append(entry)
        else:
            raise FileNotFoundError(f"data source path {entry!r} does not exist")
    for path in files:
        if not path.endswith(SUPPORTED_SUFFIXES):
            raise ValueError(f"data source file {path!r}: unsupported type (use .txt, .jsonl or .parquet)")
    # By real path: a glob through symlinked directories (Debian's python3-doc links several html trees to one)
    # matches each document under several names.
    return unique_real_paths(files)


@dataclass
class LocalFiles(Source):
    spec: str
    text_field: str = "text"
    name: str = "files"

    def __post_init__(self) -> None:
        self.files = expand_paths(self.spec)

    def documents(self) -> Iterator[str]:
        for path in self.files:
            if path.endswith(".txt"):
                yield from _read_txt(path)
            elif path.endswith(".jsonl"):
                yield from _read_jsonl(path, self.text_field)
            else:
                yield from _read_parquet(path, self.text_field)

    def describe(self) -> dict[str, Any]:
        return {"kind": "files", "text_field": self.text_field, "files": [_stat_key(p) for p in self.files]}

    def summary(self) -> dict[str, Any]:
        return {"kind": "files", "spec": self.spec, "files": len(self.files), "text_field": self.text_field}


def _read_txt(path: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if text.strip():
        yield text


def _read_jsonl(path: str, text_field: str) -> Iterator[str]:
    """The text field of every record, strictly: the first unreadable line is an error naming FILE:LINE."""
    for line in iter_jsonl_lines(path):
        where = f"{path}:{line.number}"
        if isinstance(line.error, UnicodeDecodeError):
            raise ValueError(f"{where}: not UTF-8 ({line.error.reason})")
        if line.error is not None:
            raise ValueError(f"{where}: invalid JSON ({line.error.msg})")
        record = line.value
        if not isinstance(record, dict) or text_field not in record:
            raise ValueError(f"{where}: no {text_field!r} field")
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {text_field!r} is not a string")
        if text.strip():
            yield text


def _read_parquet(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for corrupt or non-parquet files
        raise ValueError(f"{path}: not a readable parquet file ({str(error).splitlines()[0]})") from None
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no {text_field!r} column (columns: {', '.join(parquet.schema_arrow.names)})")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text and text.strip():
                yield text


@dataclass
class HFDataset(Source):
    """A `datasets` source, always streamed (no full download; the code path is the same for Hub names)."""

    path: str
    config: str | None = None
    split: str = "train"
    data_files: list[str] | None = None
    text_field: str = "text"
    name: str = "hf"

    def __post_init__(self) -> None:
        if self.data_files:
            expanded: list[str] = []
            for entry in self.data_files:
                expanded += expand_paths(entry) if not entry.startswith(("hf://", "http")) else [entry]
            self.data_files = expanded

    def _load(self):  # noqa: ANN202 - datasets.IterableDataset
        from datasets import load_dataset

        kwargs: dict[str, Any] = {"split": self.split, "streaming": True}
        if self.data_files:
            kwargs["data_files"] = self.data_files
        try:
            return load_dataset(self.path, self.config, **kwargs)
        except (FileNotFoundError, ValueError):
            raise
        except Exception as error:  # e.g. ConnectionError without network: one line, not a traceback
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(f"dataset {self.path!r} could not be opened: {type(error).__name__}: {first}") from None

    def _texts(self, dataset) -> Iterator[str]:  # noqa: ANN001
        # `.iter(batch_size)` rather than `for example in dataset`: the latter detects a torch DataLoader
        # worker and silently yields only that worker's share of files, while our stream-mode workers each
        # need the whole rank stream (they split it themselves, by document index).
        index = 0
        for batch in dataset.iter(batch_size=256):
            if self.text_field not in batch:
                raise ValueError(f"dataset {self.path!r} example {index}: no {self.text_field!r} field")
            for text in batch[self.text_field]:
                index += 1
                if isinstance(text, str) and text.strip():
                    yield text

    def documents(self) -> Iterator[str]:
        return self._texts(self._load())

    def rank_documents(self, rank: int, world_size: int) -> Iterator[str]:
        # datasets assigns whole files to ranks when it can (no rank reads another's data), else examples.
        from datasets.distributed import split_dataset_by_node

        return self._texts(split_dataset_by_node(self._load(), rank=rank, world_size=world_size))

    def describe(self) -> dict[str, Any]:
        files = [_stat_key(p) if os.path.exists(p) else p for p in (self.data_files or [])]
        local = _stat_key(self.path) if os.path.exists(self.path) else None
        return {"kind": "hf", "path": self.path, "config": self.config, "split": self.split,
                "data_files": files, "local": local, "text_field": self.text_field}

    def summary(self) -> dict[str, Any]:
        return {"kind": "hf", "path": self.path, "config": self.config, "split": self.split,
                "data_files": len(self.data_files or []), "text_field": self.text_field}


def build_source(cfg: DataConfig) -> Source:
    if cfg.source == "embedded":
        return EmbeddedCorpus(max_bytes=cfg.max_bytes, include_docs=cfg.include_docs,
                              stdlib_root=cfg.stdlib_root, docs_roots=cfg.docs_roots)
    if cfg.source.startswith("hf:"):
        return HFDataset(path=cfg.source[3:], config=cfg.hf_config, split=cfg.hf_split,
                         data_files=cfg.hf_data_files, text_field=cfg.text_field)
    return LocalFiles(spec=cfg.source, text_field=cfg.text_field)


def document_is_val(text: str, val_fraction: float) -> bool:
    """Train/val split by content hash: stable across runs, ranks, workers and source order."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction
