"""Rows in PostgreSQL's binary formats, built column by column: binary COPY data and the arrays `unnest` takes.

Both are made of the same fields (an int4 byte length, then the value in
network order; length -1 for NULL), so a batch's fields are made once per
column, mostly by C-level loops: a tag's field is cached (tags repeat from
batch to batch), a timestamp's and a quality's are made once per distinct
value in the batch (a polling group shares both), the floats are packed by
one `struct` call. About a third of what psycopg's row-by-row `write_row` costs.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import repeat

from psycopg import abc, adapt, pq

from tagwriter.models import Chunk
from tagwriter.sinks.postgresql.rows import PG_EPOCH_US

NULL = b"\xff\xff\xff\xff"  # a field of length -1
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension length
_COPY_TRAILER = b"\xff\xff"
_ROW_HEAD = b"\x00\x04"  # every row has four fields
_FLOAT_NEXT = struct.Struct(">idh")  # a float8 field, then the next row's header
_NULL_NEXT = NULL + _ROW_HEAD
_TS_FIELD = struct.Struct(">iq")
_FLOAT_FIELD = struct.Struct(">id")
#: The column order of `Encoder.copy_data` (stamp and quality side by side, the value last).
COPY_COLUMNS = ("tag", "ts", "quality", "value")
_LENGTH = struct.Struct(">i")
_ARRAY_HEAD = struct.Struct(">iiiii")  # dimensions, has NULLs, element type, length, lower bound

_TEXT, _TIMESTAMPTZ, _FLOAT8 = 25, 1184, 701  # element type oids
TAG_CACHE_MAX = 65_536  # tag fields kept; the cache starts over beyond (a plant has thousands of tags)
_FLOAT_STRUCTS_MAX = 64


class Array:
    """One array parameter already in PostgreSQL's binary array format; its class says its type."""

    __slots__ = ("data",)
    oid = 0

    def __init__(self, data: bytes) -> None:
        self.data = data


class TextArray(Array):
    oid = 1009


class TimestamptzArray(Array):
    oid = 1185


class Float8Array(Array):
    oid = 1022


class Int2Array(Array):
    oid = 1005


class Int4Array(Array):
    oid = 1007


class Int8Array(Array):
    oid = 1016


class _ArrayDumper(adapt.Dumper):
    format = pq.Format.BINARY

    def __init__(self, cls: type, context: abc.AdaptContext | None = None) -> None:
        super().__init__(cls, context)
        self.oid = cls.oid if issubclass(cls, Array) else 0

    def dump(self, obj: Array) -> bytes:
        return obj.data


def register_dumpers(adapters: adapt.AdaptersMap) -> None:
    """Let `Array` parameters go out as they are (on a connection's `adapters`)."""
    for cls in (TextArray, TimestamptzArray, Float8Array, Int2Array, Int4Array, Int8Array):
        adapters.register_dumper(cls, _ArrayDumper)


class Encoder:
    """Binary COPY data and unnest arrays of a `Chunk`. Not thread-safe (one per sink)."""

    def __init__(self, quality_type: str = "int2") -> None:
        fmt, self._q_size, self._q_oid, self._q_array = QUALITY_TYPES[quality_type]
        self._q_field = struct.Struct(fmt)
        self._tags: dict[str, bytes] = {}
        self._floats: dict[int, struct.Struct] = {}

    def copy_data(self, chunk: Chunk) -> bytes:
        """The whole binary COPY stream (header, rows, trailer) of `chunk` for COPY_COLUMNS.

        Three pieces a row when the batch has one quality (the usual case):
        the tag's field, the stamp's field with the quality's, and the value's
        field with the next row's header; joined once.
        """
        values, qualities = chunk.values, chunk.qualities
        tail = ([_NULL_NEXT if v is None else _FLOAT_NEXT.pack(8, v, 4) for v in values] if None in values
                else list(map(_FLOAT_NEXT.pack, repeat(8), values, repeat(4))))
        tags = self._tag_fields(chunk.tags)
        first = qualities[0]
        if qualities.count(first) == len(qualities):
            pieces = _interleave(tags, self._ts_fields(chunk, self._q_field.pack(self._q_size, first)), tail)
        else:
            pieces = _interleave(tags, self._ts_fields(chunk), self._quality_fields(qualities), tail)
        # The last row's "next header" becomes the trailer.
        return b"".join([_COPY_HEADER, _ROW_HEAD, *pieces])[:-2] + _COPY_TRAILER

    def arrays(self, chunk: Chunk) -> tuple[Array, Array, Array, Array]:
        """text[], timestamptz[], float8[] and the quality column's type[] of `chunk`'s columns."""
        n = len(chunk)
        return (
            TextArray(_array_head(n, 0, _TEXT) + b"".join(self._tag_fields(chunk.tags))),
            TimestamptzArray(_array_head(n, 0, _TIMESTAMPTZ) + b"".join(self._ts_fields(chunk))),
            self._float_array(chunk.values),
            self._q_array(_array_head(n, 0, self._q_oid) + b"".join(self._quality_fields(chunk.qualities))),
        )

    def _tag_fields(self, tags: Sequence[str]) -> list[bytes]:
        cache = self._tags
        try:
            return list(map(cache.__getitem__, tags))
        except KeyError:
            pass
        missing = set(tags).difference(cache)
        if len(cache) + len(missing) > TAG_CACHE_MAX:
            cache.clear()
            missing = set(tags)
        for tag in missing:
            data = tag.encode()
            cache[tag] = _LENGTH.pack(len(data)) + data
        return list(map(cache.__getitem__, tags))

    @staticmethod
    def _ts_fields(chunk: Chunk, suffix: bytes = b"") -> Sequence[bytes]:
        """Each row's stamp field (followed by `suffix`), made once per distinct stamp."""
        pack = _TS_FIELD.pack
        return chunk.stamp_column(lambda s: pack(8, s - PG_EPOCH_US) + suffix)

    def _quality_fields(self, qualities: Sequence[int]) -> Sequence[bytes]:
        pack = self._q_field.pack
        first = qualities[0]
        if qualities.count(first) == len(qualities):
            return [pack(self._q_size, first)] * len(qualities)
        field = {q: pack(self._q_size, q) for q in set(qualities)}
        return list(map(field.__getitem__, qualities))

    def _float_array(self, values: Sequence[float | None]) -> Array:
        n = len(values)
        if None in values:
            data = b"".join([NULL if v is None else _FLOAT_FIELD.pack(8, v) for v in values])
            return Float8Array(_array_head(n, 1, _FLOAT8) + data)
        packer = self._floats.get(n)
        if packer is None:
            if len(self._floats) >= _FLOAT_STRUCTS_MAX:
                self._floats.clear()
            packer = self._floats[n] = struct.Struct(">" + "id" * n)
        flat: list[object] = [8] * (2 * n)  # each length, then its value
        flat[1::2] = values
        data = packer.pack(*flat)
        return Float8Array(_array_head(n, 0, _FLOAT8) + data)


#: Binary types of the quality column: name -> (struct of its field, byte size, element oid, array class).
QUALITY_TYPES: dict[str, tuple[str, int, int, type[Array]]] = {
    "int2": (">ih", 2, 21, Int2Array), "int4": (">ii", 4, 23, Int4Array), "int8": (">iq", 8, 20, Int8Array),
}


def _interleave(*columns: Sequence[bytes]) -> list[bytes]:
    """[a0, b0, ..., a1, b1, ...] of equally long columns, by slice assignment (C-level)."""
    k = len(columns)
    out = [b""] * (k * len(columns[0]))
    for i, column in enumerate(columns):
        out[i::k] = column
    return out


def _array_head(n: int, has_null: int, oid: int) -> bytes:
    return _ARRAY_HEAD.pack(1, has_null, oid, n, 1)
