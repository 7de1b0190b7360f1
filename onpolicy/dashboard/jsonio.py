"""JSON parsing shared by the readers: orjson when installed (it parses a
10,000-line metrics.jsonl several times faster), the standard library otherwise;
either way Python's own ``NaN``/``Infinity`` tokens are accepted."""
from __future__ import annotations

import json

try:
    import orjson as _orjson

    def loads(b: bytes):
        try:
            return _orjson.loads(b)
        except _orjson.JSONDecodeError:
            # Python's json.dumps writes NaN / Infinity, which orjson rejects
            return json.loads(b)

    JSONError = (_orjson.JSONDecodeError, json.JSONDecodeError, UnicodeDecodeError)
except ImportError:  # pragma: no cover
    loads = json.loads
    JSONError = (json.JSONDecodeError, UnicodeDecodeError)

__all__ = ["loads", "JSONError"]
