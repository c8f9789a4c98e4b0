"""Each raw file's content hash, remembered by its size and modification time, so that prepare need not read an
unchanged dataset again to know its cache key."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


class HashIndex:
    """Remembers each file's (size, mtime) → sha256, so an unchanged dataset is not read again to find its key.

    The same idea as DVC's state database: a file whose size and modification time are unchanged keeps its hash.
    Stored as tab-separated lines (path, size, mtime in ns, sha256): a cache, safe to delete.
    """

    def __init__(self, folder: Path, root: Path) -> None:
        self.path = folder / (hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16] + ".tsv")
        self.entries: dict[str, list] = {}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return
        for line in lines:
            rel, size, mtime, digest = line.rsplit("\t", 3)
            self.entries[rel] = [int(size), int(mtime), digest]

    def lookup(self, files: list[str], rels: list[str]) -> list[str] | None:
        """Every file's hash when all are known and unchanged, else None."""
        digests = []
        for file, rel in zip(files, rels, strict=True):
            entry = self.entries.get(rel)
            if entry is None or entry[:2] != _stat(file):
                return None
            digests.append(entry[2])
        return digests

    def update(self, rels: list[str], digests: list[str], file_stats: np.ndarray) -> None:
        """Record the hashes of the files just read, with the size and mtime they had when read."""
        for rel, digest, (size, mtime) in zip(rels, digests, file_stats.tolist(), strict=True):
            if digest:
                self.entries[rel] = [size, mtime, digest]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        text = "".join(f"{rel}\t{size}\t{mtime}\t{digest}\n" for rel, (size, mtime, digest) in self.entries.items())
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path)


def _stat(file: str) -> list[int] | None:
    try:
        st = os.stat(file)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]
