"""JSON parsing shared by the readers: orjson when installed (it parses a
10,000-line metrics.jsonl several times faster), the standard library otherwise;
either way Python's own ``NaN``/``Infinity`` tokens are accepted."""
from __future__ import annotations

import json



def _std_loads(b):
    # bytes are UTF-8 here (docs/metrics-format.md); json.loads(bytes) would guess
    # UTF-16/32 from NUL bytes and name those codecs in its error
    return json.loads(b.decode("utf-8") if isinstance(b, (bytes, bytearray)) else b)


try:
    import orjson as _orjson

    def loads(b: bytes):
        try:
            return _orjson.loads(b)
        except _orjson.JSONDecodeError:
            # Python's json.dumps writes NaN / Infinity, which orjson rejects
            return _std_loads(b)

    JSONError = (_orjson.JSONDecodeError, json.JSONDecodeError, UnicodeDecodeError)
except ImportError:  # pragma: no cover
    loads = _std_loads
    JSONError = (json.JSONDecodeError, UnicodeDecodeError)

__all__ = ["loads", "JSONError"]
