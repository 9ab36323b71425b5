"""SentencePiece BPE tokenizer that round-trips source code exactly, plus its metadata file.

Default sentencepiece settings normalise text (NFKC, collapsed spaces, a dummy prefix space), which destroys
indentation. Here: identity normalisation, no whitespace removal, whitespace-only pieces allowed (runs of
indentation become single tokens), byte fallback (no <unk> for unseen characters), and "\n" and "\t" as
user-defined pieces. The trainer reads one line per "sentence" (sentencepiece's unit), so newlines are never
inside training sentences; at encode time whole documents are passed and "\n" maps to its own piece.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import sentencepiece as spm

from fsutil import atomic_write_bytes, sha256_file

from .config import MIN_VOCAB
from .sources import Source

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Beyond the 256 byte pieces, 4 specials and 2 user pieces, BPE needs some room for merges (data.config).


@dataclass
class TokenizerMeta:
    vocab_size: int
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    model_sha256: str
    sources_hash: str
    sources: dict[str, Any]
    max_sentences: int
    sentences_used: int

    @property
    def short_hash(self) -> str:
        return self.model_sha256[:12]


def _sentences(source: Source, counter: list[int]) -> Iterator[str]:
    for text in source.documents():
        for line in text.split("\n"):
            if line:
                counter[0] += 1
                yield line


def train_tokenizer(source: Source, out_dir: str, *, vocab_size: int = 4096, max_sentences: int = 200_000,
                    num_threads: int = 2, seed: int = 0) -> TokenizerMeta:
    """Train BPE on `source` and write out_dir/tokenizer.model + tokenizer.json (both appear atomically)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab size {vocab_size} is too small (minimum {MIN_VOCAB}: 256 byte pieces + specials)")
    if max_sentences <= 100:  # sentencepiece's own lower bound for input_sentence_size
        raise ValueError(f"tokenizer max sentences must be more than 100, got {max_sentences}")
    counter = [0]
    sentences = _sentences(source, counter)
    first = next(sentences, None)
    if first is None:
        raise ValueError(f"source {source.name!r} yielded no text to train a tokenizer on{_why_empty(source)}")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_chain_first(first, sentences), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_by_whitespace=True, split_digits=True,
            user_defined_symbols=["\n", "\t"], max_sentence_length=1 << 14,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            num_threads=max(1, num_threads), minloglevel=2,
        )
    except RuntimeError as error:  # e.g. "Vocabulary size too high" on a tiny corpus
        raise ValueError(f"tokenizer training failed: {str(error).strip().splitlines()[-1]}") from None

    os.makedirs(out_dir, exist_ok=True)
    model_bytes = model.getvalue()
    meta = TokenizerMeta(
        vocab_size=vocab_size, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        model_sha256=hashlib.sha256(model_bytes).hexdigest(), sources_hash=source.fingerprint(),
        sources=source.summary(), max_sentences=max_sentences, sentences_used=min(counter[0], max_sentences),
    )
    # Metadata is written last and names the model's hash, so a reader never pairs it with another model.
    atomic_write_bytes(os.path.join(out_dir, MODEL_FILE), model_bytes)
    atomic_write_bytes(os.path.join(out_dir, META_FILE), json.dumps(asdict(meta), indent=2).encode())
    return meta


def _why_empty(source: Source) -> str:
    """Which files an empty source read, so the message names them (a zero-byte file is the usual cause)."""
    files = list(getattr(source, "files", None) or [])
    if not files:
        return ""

    def describe(path: str) -> str:
        size = os.path.getsize(path) if os.path.exists(path) else None
        return f"{path!r} is empty (0 bytes)" if size == 0 else f"{path!r} holds only whitespace or empty records"

    if len(files) == 1:
        return f": {describe(files[0])}"
    shown = ", ".join(repr(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return f": its {len(files)} files ({shown}) are empty or hold only whitespace"


def _chain_first(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def model_path(tokenizer_dir: str) -> str:
    return tokenizer_dir if tokenizer_dir.endswith(".model") else os.path.join(tokenizer_dir, MODEL_FILE)


def tokenizer_exists(tokenizer_dir: str) -> bool:
    path = model_path(tokenizer_dir)
    return os.path.isfile(path) and os.path.isfile(os.path.join(os.path.dirname(path), META_FILE))


def load_meta(tokenizer_dir: str) -> TokenizerMeta:
    path = model_path(tokenizer_dir)
    meta_path = os.path.join(os.path.dirname(path), META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer model {path!r} does not exist (run `ebt tokenizer train`)")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"tokenizer metadata {meta_path!r} does not exist")
    with open(meta_path) as handle:
        meta = TokenizerMeta(**json.load(handle))
    actual = sha256_file(path)
    if actual != meta.model_sha256:
        raise ValueError(f"tokenizer {path!r} has hash {actual[:12]} but {meta_path!r} says {meta.short_hash}")
    return meta


def load_processor(tokenizer_dir: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=model_path(tokenizer_dir))
