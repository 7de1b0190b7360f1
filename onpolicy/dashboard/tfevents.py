"""Scalars out of TensorBoard event files, without TensorBoard.

An event file is a sequence of TFRecords::

    uint64 length | uint32 masked_crc32c(length) | bytes data[length] | uint32 masked_crc32c(data)

each ``data`` an ``Event`` protobuf (tensorflow/core/util/event.proto):
``wall_time`` (1, double), ``step`` (2, int64), ``summary`` (5, Summary). A
``Summary`` holds repeated ``value`` (1) entries with ``tag`` (1) and either
``simple_value`` (2, float; what torch's and tensorboardX's ``add_scalar``
write) or a ``tensor`` (8, TensorProto; tf2-style scalars). Only the few fields
needed for scalars are decoded here, with a hand-written protobuf wire-format
reader, so reading a TRL run needs neither TensorBoard nor TensorFlow.

:class:`EventFileReader` reads incrementally: it remembers the byte offset of
the first record it has not consumed, so a file that is still being written is
re-read only from there. A record cut short at the end of the file is left for
the next read; a record whose length checksum is wrong ends the file with a
warning (the framing can no longer be trusted); a record whose data checksum is
wrong is skipped with a warning. Checksums are always verified (CRC-32C from the
``google-crc32c`` package, a dependency).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import google_crc32c

# --- CRC-32C (Castagnoli), as TFRecord framing uses it -----------------------
# google-crc32c (Google's C library, with its own pure-Python fallback where no
# wheel exists) is a dependency, so every record's length and data are checked.

def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``."""
    return google_crc32c.value(bytes(data))


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data``."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- protobuf wire format -----------------------------------------------------

class DecodeError(ValueError):
    pass


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if i >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def iter_fields(buf: bytes):
    """Yield (field_number, wire_type, value) of a protobuf message; value is an
    int for varint/fixed types and a bytes slice for length-delimited ones."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        fnum, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            if i + 8 > n:
                raise DecodeError("truncated fixed64")
            v = buf[i:i + 8]
            i += 8
        elif wt == 2:
            ln, i = _varint(buf, i)
            if i + ln > n:
                raise DecodeError("truncated length-delimited field")
            v = buf[i:i + ln]
            i += ln
        elif wt == 5:
            if i + 4 > n:
                raise DecodeError("truncated fixed32")
            v = buf[i:i + 4]
            i += 4
        else:
            raise DecodeError(f"unsupported wire type {wt}")
        yield fnum, wt, v


# TensorProto dtypes that hold a real scalar.
_DT_FLOAT, _DT_DOUBLE, _DT_INT32, _DT_INT64, _DT_HALF, _DT_BFLOAT16 = 1, 2, 3, 9, 19, 14


def _tensor_scalar(buf: bytes) -> float | None:
    """The value of a scalar TensorProto, or None if it is not one."""
    dtype = None
    dims = 0
    content = b""
    floats: list[float] = []
    for f, wt, v in iter_fields(buf):
        if f == 1 and wt == 0:
            dtype = v
        elif f == 2 and wt == 2:  # TensorShapeProto: repeated Dim dim = 2
            for ff, _, dv in iter_fields(v):
                if ff == 2:
                    for fff, _, size in iter_fields(dv):
                        if fff == 1 and size != 1:
                            return None
                    dims += 1
        elif f == 4 and wt == 2:
            content = bytes(v)
        elif f == 5:  # float_val (packed or not)
            floats += struct.unpack(f"<{len(v) // 4}f", v) if wt == 2 else list(struct.unpack("<f", v))
        elif f == 6:  # double_val
            floats += struct.unpack(f"<{len(v) // 8}d", v) if wt == 2 else list(struct.unpack("<d", v))
        elif f in (7, 10) and wt == 0:  # int_val, int64_val (unpacked)
            floats.append(float(v - (1 << 64) if v >= 1 << 63 else v))
        elif f in (7, 10) and wt == 2:  # packed ints
            j = 0
            while j < len(v):
                x, j = _varint(v, j)
                floats.append(float(x - (1 << 64) if x >= 1 << 63 else x))
    if content:
        fmt = {_DT_FLOAT: "<f", _DT_DOUBLE: "<d", _DT_INT32: "<i", _DT_INT64: "<q"}.get(dtype)
        if fmt is None or len(content) != struct.calcsize(fmt):
            return None
        return float(struct.unpack(fmt, content)[0])
    if dtype not in (_DT_FLOAT, _DT_DOUBLE, _DT_INT32, _DT_INT64, _DT_HALF, _DT_BFLOAT16):
        return None
    if len(floats) != 1:
        return None
    return float(floats[0])


def decode_event(data: bytes) -> tuple[float | None, int, dict[str, float]]:
    """(wall_time, step, {tag: scalar}) of one serialized Event."""
    wall_time = None
    step = 0
    scalars: dict[str, float] = {}
    for f, wt, v in iter_fields(data):
        if f == 1 and wt == 1:
            wall_time = struct.unpack("<d", v)[0]
        elif f == 2 and wt == 0:
            step = v - (1 << 64) if v >= 1 << 63 else v
        elif f == 5 and wt == 2:
            for ff, _, val in iter_fields(v):
                if ff != 1:
                    continue
                tag = None
                value = None
                for g, gwt, x in iter_fields(val):
                    if g == 1 and gwt == 2:
                        tag = bytes(x).decode("utf-8", "replace")
                    elif g == 2 and gwt == 5:
                        value = struct.unpack("<f", x)[0]
                    elif g == 8 and gwt == 2 and value is None:
                        value = _tensor_scalar(x)
                if tag is not None and value is not None:
                    scalars[tag] = value
    return wall_time, step, scalars


@dataclass
class EventFileReader:
    """Incremental reader of one event file (see the module docstring)."""

    path: str
    offset: int = 0
    records: int = 0
    dead: bool = False            # framing corrupt: stop reading this file
    mtime: float | None = None    # of the file, at the last read
    warnings: list[str] = field(default_factory=list)
    _ident: tuple | None = None

    def read_new(self):
        """Yield (wall_time, step, scalars) for every complete record written
        since the last call. Restarts from 0 if the file was replaced/truncated."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        ident = (st.st_ino, st.st_dev)
        self.mtime = st.st_mtime
        if self._ident is not None and (ident != self._ident or st.st_size < self.offset):
            self.offset, self.records, self.dead = 0, 0, False
            self.warnings.append(f"{os.path.basename(self.path)}: file was replaced or truncated; re-read")
        self._ident = ident
        if self.dead or st.st_size <= self.offset:
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            buf = fh.read(st.st_size - self.offset)
        i, n = 0, len(buf)
        name = os.path.basename(self.path)
        while i + 12 <= n:
            header = buf[i:i + 8]
            (length,) = struct.unpack("<Q", header)
            (len_crc,) = struct.unpack("<I", buf[i + 8:i + 12])
            if masked_crc32c(header) != len_crc:
                self.dead = True
                self.warnings.append(f"{name}: corrupt record header at byte {self.offset + i}; "
                                     "the rest of this file is ignored")
                break
            end = i + 12 + length + 4
            if end > n:
                break  # partly written: wait for the rest
            data = buf[i + 12:i + 12 + length]
            i = end
            self.records += 1
            (data_crc,) = struct.unpack("<I", buf[end - 4:end])
            if masked_crc32c(data) != data_crc:
                self.warnings.append(f"{name}: record {self.records} fails its CRC-32C checksum (a corrupt "
                                     "file?); skipped")
                continue
            try:
                yield decode_event(data)
            except (DecodeError, struct.error, UnicodeDecodeError) as e:
                self.warnings.append(f"{name}: record {self.records} does not decode ({e}); skipped")
        self.offset += i
