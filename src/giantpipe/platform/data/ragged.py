"""Ragged arrays on disk: many variable-length rows (token ids, feature frames, UTF-8 text) as
one flat array file plus row offsets.

A corpus stored this way costs a process no private memory beyond the rows it is using: a row
is read (`pread`) from the page cache, which every process that opens the same files shares,
so a pipeline's stages and a sweep's jobs hold one copy between them, and a process's resident
memory does not grow with the rows it has read. Rows are written in chunks
(`RaggedWriter.extend`), never gathered in memory first.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path

import numpy as np


class RaggedWriter:
    """Appends rows to `<name>.bin` (flat, `dtype`) and, on `close`, writes `<name>.offsets.npy`
    and `<name>.json` (dtype and the trailing row shape)."""

    def __init__(self, folder: Path, name: str, dtype, row_shape: tuple[int, ...] = ()) -> None:
        self.folder, self.name = Path(folder), name
        self.dtype, self.row_shape = np.dtype(dtype), tuple(row_shape)
        self._file = open(self.folder / f"{name}.bin", "wb")
        self._lengths: list[np.ndarray] = []

    def extend(self, rows: Sequence[np.ndarray | Sequence[int]]) -> None:
        """Append rows: arrays of shape (n, *row_shape), or lists of numbers (1-D rows)."""
        if not len(rows):
            return
        lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
        if isinstance(rows[0], np.ndarray):
            flat = np.concatenate([np.asarray(r, self.dtype).reshape(-1, *self.row_shape) for r in rows])
        else:  # token id lists: one pass, no array per row
            flat = np.fromiter(chain.from_iterable(rows), self.dtype, int(lengths.sum()))
        self.append_flat(flat.tobytes(), lengths)

    def append_flat(self, data: bytes, lengths: np.ndarray) -> None:
        """Append rows already laid end to end in `data`, `lengths[i]` rows of row_shape each."""
        self._lengths.append(np.asarray(lengths, np.int64))
        self._file.write(data)

    def close(self) -> None:
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(self.folder / f"{self.name}.offsets.npy", offsets)
        meta = {"dtype": self.dtype.str, "row_shape": list(self.row_shape)}
        (self.folder / f"{self.name}.json").write_text(json.dumps(meta))


_TWO_INT64 = struct.Struct("<qq")  # a row's start and stop in the offsets file


def pread_array(fd: int, offset: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A fresh array of `shape` read from file `fd` at byte `offset` (no page of it is mapped
    into the process); a file shorter than that is an error, not a row of garbage."""
    out = np.empty(shape, dtype)
    if out.nbytes and os.preadv(fd, [out], offset) != out.nbytes:
        raise OSError(f"{out.nbytes} bytes at offset {offset} run past the end of the file: it is truncated")
    return out


class Ragged:
    """Read-only rows of a `RaggedWriter`'s files. `ragged[i]` reads row i with `pread` into a
    fresh array: a process holds only the rows it is using, however many it has read (a memory
    map would keep every page it touched, and the pages around them, resident). `flat` and
    `offsets` map the whole files, for reading them in bulk."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = Path(folder), name
        meta = json.loads((Path(folder) / f"{name}.json").read_text())
        offsets = np.load(Path(folder) / f"{name}.offsets.npy", mmap_mode="r")
        # plain ndarray views of the maps: slicing a np.memmap costs a subclass object a row
        self.offsets = np.asarray(offsets)
        self.dtype, self.row_shape = np.dtype(meta["dtype"]), tuple(meta["row_shape"])
        path = Path(folder) / f"{name}.bin"
        if path.stat().st_size:
            self.flat = np.asarray(np.memmap(path, dtype=self.dtype, mode="r")).reshape(-1, *self.row_shape)
        else:  # numpy cannot map an empty file
            self.flat = np.zeros((0, *self.row_shape), self.dtype)
        self._row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        self._offsets_start = offsets.offset  # the .npy header's length
        self._rows = len(offsets) - 1
        self._files = (os.open(path, os.O_RDONLY), os.open(Path(folder) / f"{name}.offsets.npy", os.O_RDONLY))

    def __getstate__(self) -> dict:
        """Pickled (to DataLoader workers) as its file names: a memmap would pickle its data."""
        return {"folder": self.folder, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"], state["name"])

    def __del__(self) -> None:
        for fd in getattr(self, "_files", ()):
            os.close(fd)

    def __len__(self) -> int:
        return self._rows

    def bounds(self, index: int) -> tuple[int, int]:
        """Where row `index` starts and stops in `flat` (read from the offsets file, not its map)."""
        if not 0 <= index < self._rows:
            if not -self._rows <= index < 0:
                raise IndexError(f"row {index} of {self._rows}")
            index += self._rows
        return _TWO_INT64.unpack(os.pread(self._files[1], 16, self._offsets_start + 8 * index))

    def __getitem__(self, index: int) -> np.ndarray:
        start, stop = self.bounds(index)
        return pread_array(self._files[0], start * self._row_bytes, (stop - start, *self.row_shape), self.dtype)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))


class TextColumn:
    """Strings stored as UTF-8 bytes in a `Ragged`: `column[i]` decodes row i."""

    def __init__(self, folder: Path, name: str) -> None:
        self.rows = Ragged(folder, name)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> str:
        return self.rows[index].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


def write_texts(writer: RaggedWriter, texts: Sequence[str]) -> None:
    """Append strings as UTF-8 rows to a uint8 writer."""
    encoded = [t.encode("utf-8") for t in texts]
    writer.append_flat(b"".join(encoded), np.fromiter(map(len, encoded), np.int64, len(encoded)))


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id (uint16 up to 65,536 pieces)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)
