"""How the durable queue keeps values: one record (a *chunk*) per submit, and a look at a torn WAL.

A chunk holds the rows of one submit column by column, so that encoding and
decoding are a few C-level passes, not one object per field, and it decodes
into a `models.Chunk`, the columns the buffer and the sinks take as they are:

    u32 tag bytes | u32 null count | tags (UTF-8, joined by "\\n") |
    ts  (n x int64) | value (n x float64) | quality (n x int64) | null positions (u32 each)

Tag names never hold a line break (`models.check_tag_names` refuses it), so the
join is unambiguous. A `None` value is stored as 0.0 with its position in the
null list, so a NaN a caller submits stays a NaN. Each record carries a CRC-32
over its first position, its length and its bytes: SQLite checks the structure
of its pages, not their content, and a flipped bit inside a record must be
found, not written to the database as a changed value.

`torn_wal_tail` reads a SQLite WAL file's frame headers (the format is in
https://www.sqlite.org/fileformat2.html#walformat) to say where a write was cut
short: SQLite ignores such a tail by itself when it opens the database, and
this tells the operator that it did and where.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tagwriter.models import Chunk, TagValue

_HEAD = struct.Struct("<II")
_CRC_SEED = struct.Struct("<qq")
_LITTLE = sys.byteorder == "little"


class ChunkError(ValueError):
    """A chunk's bytes do not check out (CRC or layout): it cannot be trusted."""


def encode_chunk(rows: Sequence[TagValue]) -> bytes:
    """The record of `rows` (see the module docstring)."""
    chunk = Chunk.of(rows)
    tags, stamps, values, qualities = chunk.tags, chunk.stamps, chunk.values, chunk.qualities
    nulls = [i for i, v in enumerate(values) if v is None] if None in values else []
    floats = [0.0 if v is None else v for v in values] if nulls else cast("list[float]", values)
    text = "\n".join(tags).encode("utf-8")
    parts: list[array[Any]] = [array("q", stamps), array("d", floats), array("q", qualities), array("I", nulls)]
    if not _LITTLE:
        for part in parts:
            part.byteswap()
    return b"".join((_HEAD.pack(len(text), len(nulls)), text, *(p.tobytes() for p in parts)))


def decode_chunk(data: bytes, n: int) -> Chunk:
    """The rows of a record of `n` values; ChunkError if its layout does not add up."""
    try:
        text_len, null_count = _HEAD.unpack_from(data)
    except struct.error:
        raise ChunkError("record shorter than its header") from None
    body = _HEAD.size + text_len
    if len(data) != body + 24 * n + 4 * null_count:
        raise ChunkError(f"record of {len(data)} bytes does not hold {n} values")
    tags = data[_HEAD.size:body].decode("utf-8").split("\n")
    if len(tags) != n:
        raise ChunkError(f"record holds {len(tags)} tag names for {n} values")
    stamps, values, qualities, nulls = array("q"), array("d"), array("q"), array("I")
    at = body
    for part, size in ((stamps, 8 * n), (values, 8 * n), (qualities, 8 * n), (nulls, 4 * null_count)):
        part.frombytes(data[at:at + size])
        at += size
        if not _LITTLE:
            part.byteswap()
    out_values: list[float | None] = values.tolist()  # type: ignore[assignment]
    for i in nulls:
        if i >= n:
            raise ChunkError(f"null position {i} outside {n} values")
        out_values[i] = None
    column = stamps.tolist()
    runs = ((column[0], n),) if n and column.count(column[0]) == n else None  # a polling group: one run
    return Chunk(tags, column, out_values, qualities.tolist(), runs)


def chunk_crc(seq: int, n: int, data: bytes) -> int:
    """The CRC-32 a record is stored with: over its first position, its length and its bytes."""
    return zlib.crc32(data, zlib.crc32(_CRC_SEED.pack(seq, n)))


# -- the WAL ---------------------------------------------------------------

_WAL_HEADER = 32
_FRAME_HEADER = 24
_WAL_MAGIC = (0x377F0682, 0x377F0683)  # checksums little-endian / big-endian


@dataclass(frozen=True, slots=True)
class TornTail:
    """Bytes at the end of a WAL after its last complete transaction: what SQLite will ignore."""

    offset: int  # where the tail starts (the end of the last committed frame)
    size: int  # bytes in it
    frames: int  # complete frames in it (of an unfinished transaction), besides a partial one


def torn_wal_tail(path: Path) -> TornTail | None:
    """The torn tail of the WAL at `path`, or None if it ends with a committed transaction (or is absent).

    Walks the frames whose salts match the header's and whose checksum chain
    holds, as SQLite's recovery does; a tail after the last commit frame (or a
    partial frame) is what a write cut short leaves. Frames of an older WAL
    generation (other salts) after that are a normal leftover, not a tear.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) < _WAL_HEADER:
        return TornTail(0, len(data), 0) if data else None
    magic, _version, page_size, _seq, salt1, salt2, c1, c2 = struct.unpack(">IIIIIIII", data[:_WAL_HEADER])
    if magic not in _WAL_MAGIC or page_size < 512 or page_size & (page_size - 1):
        return TornTail(0, len(data), 0)
    big = magic & 1
    if (c1, c2) != _checksum(data[:24], 0, 0, big):
        return TornTail(0, len(data), 0)
    frame = _FRAME_HEADER + page_size
    committed_end = at = _WAL_HEADER
    frames_since = 0
    s1, s2 = c1, c2
    while at + frame <= len(data):
        page_no, commit_size, f_salt1, f_salt2, f_c1, f_c2 = struct.unpack(">IIIIII", data[at:at + 24])
        if (f_salt1, f_salt2) != (salt1, salt2) or page_no == 0:
            break
        s1, s2 = _checksum(data[at + _FRAME_HEADER:at + frame], *_checksum(data[at:at + 8], s1, s2, big), big)
        if (s1, s2) != (f_c1, f_c2):
            break
        at += frame
        frames_since += 1
        if commit_size:
            committed_end, frames_since = at, 0
    end = at
    if end + frame > len(data) and end < len(data):  # a partial frame: is it of this generation?
        tail = data[end:end + 16]
        if len(tail) < 16 or struct.unpack(">II", tail[8:16]) == (salt1, salt2):
            end = len(data)
    if end == committed_end:
        return None
    return TornTail(committed_end, end - committed_end, frames_since)


def _checksum(data: bytes, s1: int, s2: int, big: int) -> tuple[int, int]:
    """SQLite's WAL checksum over `data` (a multiple of 8 bytes), continuing from (s1, s2)."""
    words = array("I", data)
    if big == _LITTLE:  # the words are stored in the other byte order
        words.byteswap()
    mask = 0xFFFFFFFF
    for i in range(0, len(words), 2):
        s1 = (s1 + words[i] + s2) & mask
        s2 = (s2 + words[i + 1] + s1) & mask
    return s1, s2


def sync_directory(directory: Path) -> None:
    """fsync a folder, so that a file made (or renamed) in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
