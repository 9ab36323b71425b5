"""sha256 of files (checkpoint manifests, tokenizer metadata): read back in chunks, or computed while writing.

`HashingWriter` digests bytes as they go to disk, so a checkpoint file the project serializes itself is never read
back to be hashed (at xl a rank's state is GBs; reading it again costs as much as writing it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class HashingWriter:
    """A write-only binary stream over `file` that keeps the sha256 and the count of everything written.

    torch.save writes through `write` (it needs no seek for a file-like object), so the digest is that of the file
    as it lands on disk."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.bytes += view.nbytes
        return self.file.write(view)

    def flush(self) -> None:
        self.file.flush()

    def hexdigest(self) -> str:
        return self.digest.hexdigest()
