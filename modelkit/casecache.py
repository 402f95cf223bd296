"""Preprocessed training cases on disk, opened memory-mapped (the training's case cache).

Training draws random patches from every case on the model grid. Held in memory, a case
costs about 43 bytes per model voxel with soft labels (image 4, label 1, class fractions
30, patch-sampling indices 4-8): ~0.8 GB for a hip-to-knee CT at the production 1.5 mm
grid, so a site with 60 labelled CTs would need ~50 GB of RAM before the first step. Here
each case is preprocessed once, written as ``.npy`` files and opened with
``np.load(mmap_mode="r")``: patches read only the pages they touch, and those pages are the
kernel's file cache, reclaimable under memory pressure, not the process's own memory. A
second run on the same data (a resume, a fine-tune, the next demo stage) skips the
NIfTI/DICOM decoding and resampling altogether.

An entry is keyed by what made it: the source files (resolved path, size, modification
time), the preprocessing settings, the label-table size and whether soft labels were
asked for, and :data:`CACHE_FORMAT`. A changed source file or setting gives a new entry;
old entries stay until deleted (the folder may be removed at any time). Entries are
written into a temporary folder and renamed into place, so an interrupted write or two
runs preparing the same case never leave a half entry; an entry that cannot be read is
prepared again, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: Bump when what an entry holds changes meaning (old entries are then simply not found).
CACHE_FORMAT = 1
ENTRY_FILE = "entry.json"
#: A temporary folder older than this is the leftover of a killed run (a case is written in seconds).
STALE_TMP_S = 6 * 3600


def source_fingerprint(files: Iterable[Path]) -> list[list]:
    """(resolved path, size, mtime_ns) of each file, sorted: what the cache key trusts the
    sources by (content hashing gigabytes of CT at every start would cost minutes)."""
    out = []
    for f in files:
        st = Path(f).stat()
        out.append([str(Path(f).resolve()), int(st.st_size), int(st.st_mtime_ns)])
    return sorted(out)


def cache_key(files: Iterable[Path], recipe: Mapping) -> str:
    """Hex key of an entry: the sources' fingerprint and the ``recipe`` (everything else that
    shapes the arrays: preprocessing settings, soft labels, number of classes)."""
    text = json.dumps({"format": CACHE_FORMAT, "sources": source_fingerprint(files), "recipe": recipe},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _entry_dir(root: Path, name: str, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80] or "case"
    return root / f"{safe}-{key}"


def _write_entry(final: Path, name: str, key: str, arrays: Mapping[str, np.ndarray]) -> None:
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        meta = {"format": CACHE_FORMAT, "name": name, "key": key, "arrays": {}}
        for array_name, array in arrays.items():
            a = np.ascontiguousarray(array)
            np.save(tmp / f"{array_name}.npy", a, allow_pickle=False)
            meta["arrays"][array_name] = {"shape": list(a.shape), "dtype": a.dtype.str}
        (tmp / ENTRY_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")  # written last: complete
        try:
            tmp.rename(final)
        except OSError:
            if not (final / ENTRY_FILE).is_file():  # not another run's complete entry: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _open_entry(entry: Path) -> dict[str, np.ndarray]:
    """The arrays of a complete entry, memory-mapped read-only; ValueError/OSError when damaged."""
    meta = json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, expected {CACHE_FORMAT}")
    arrays = {}
    for array_name, spec in meta["arrays"].items():
        a = np.load(entry / f"{array_name}.npy", mmap_mode="r", allow_pickle=False)
        if list(a.shape) != spec["shape"] or a.dtype.str != spec["dtype"]:
            raise ValueError(f"{array_name}.npy is {a.dtype.str}{list(a.shape)}, entry.json says "
                             f"{spec['dtype']}{spec['shape']}")
        arrays[array_name] = a
    return arrays


class CaseCache:
    """A folder of cache entries. :meth:`fetch` returns an entry's arrays memory-mapped,
    building and writing them first when the entry is missing or damaged."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.reused = 0
        self.prepared = 0
        self.bytes = 0
        self._swept = False

    def _sweep(self) -> None:
        """Remove temporary folders left by killed runs (once per cache object)."""
        if self._swept or not self.root.is_dir():
            return
        self._swept = True
        for tmp in self.root.glob(".tmp-*"):
            try:
                if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                    shutil.rmtree(tmp, ignore_errors=True)
            except OSError:
                pass

    def fetch(self, name: str, files: Iterable[Path], recipe: Mapping,
              build: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        files = list(files)
        key = cache_key(files, recipe)
        entry = _entry_dir(self.root, name, key)
        if (entry / ENTRY_FILE).is_file():
            try:
                arrays = _open_entry(entry)
                self.reused += 1
                self.bytes += sum(a.nbytes for a in arrays.values())
                return arrays
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("case cache entry %s cannot be read (%s); preparing case %s again", entry, exc, name)
                shutil.rmtree(entry, ignore_errors=True)
        elif entry.exists():  # a folder without entry.json is not an entry (copied in part, edited by hand)
            logger.warning("case cache folder %s is incomplete; preparing case %s again", entry, name)
            shutil.rmtree(entry, ignore_errors=True)
        arrays_to_write = build()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._sweep()
            _write_entry(entry, name, key, arrays_to_write)
        except OSError as exc:
            raise OSError(f"case cache {self.root}: cannot write the entry of case {name} ({exc}); free space "
                          "there, point case_cache_dir at another disk, or set case_cache = false to hold the "
                          "cases in memory") from exc
        del arrays_to_write
        arrays = _open_entry(entry)
        self.prepared += 1
        self.bytes += sum(a.nbytes for a in arrays.values())
        return arrays

    def counts(self) -> tuple[int, int, int]:
        """(entries reused, entries prepared, bytes mapped) so far."""
        return self.reused, self.prepared, self.bytes

    def summary(self, since: tuple[int, int, int] = (0, 0, 0)) -> str:
        """One log line; ``since``: an earlier :meth:`counts`, to report only what came after it."""
        reused, prepared, size = (a - b for a, b in zip(self.counts(), since))
        return (f"case cache {self.root}: {reused} case(s) reused, {prepared} prepared, "
                f"{size / 1e9:.2f} GB memory-mapped")
