"""The files ppl writes with ``torch.save`` (trained guides, small language models):
written with a checksum of their contents, read back with every failure a ``PPLError``
that names the file and what is wrong with it.

* ``save_checked(blob, path)``: ``torch.save`` of the dict ``blob`` plus a ``"checksum"``
  entry: the sha256 of a canonical encoding of everything else in it (every tensor's
  dtype, shape and bytes; every string, number and container), so that any change to
  what loads back (a flipped byte in a weight, a truncated list) is caught, whatever
  the zip container around it does.
* ``load_checked(path, what)``: ``torch.load(weights_only=True)`` (no code in the file
  can run), with a clear error for a missing file, a directory, an empty, truncated or
  corrupt file, a file that is not a dict, and a checksum that does not match. Returns
  (blob, whether it had a checksum) so callers decide how to treat old files.
* ``check_fields(blob, fields, path, what)``: every required entry present with the
  right type.
"""
from __future__ import annotations

import hashlib
import os
import struct
from typing import Any, Callable, Mapping

import torch

from ..semantics.errors import PPLError

CHECKSUM_KEY = "checksum"


def payload_digest(blob: Mapping[str, Any]) -> str:
    """sha256 (hex) of a canonical encoding of ``blob`` without its checksum entry."""
    h = hashlib.sha256()
    _encode({k: v for k, v in blob.items() if k != CHECKSUM_KEY}, h.update)
    return h.hexdigest()


def _encode(v: Any, out: Callable[[bytes], Any]) -> None:
    """Feed a type-tagged, length-prefixed encoding of ``v`` to ``out``."""
    def tagged(tag: bytes, data: bytes) -> None:
        out(tag + struct.pack("<Q", len(data)) + data)

    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        tagged(b"T", f"{t.dtype}{tuple(t.shape)}".encode())
        tagged(b"B", t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(v, Mapping):
        items = sorted(v.items(), key=lambda kv: repr(kv[0]))
        tagged(b"D", str(len(items)).encode())
        for k, x in items:
            _encode(k, out)
            _encode(x, out)
    elif isinstance(v, (list, tuple)):
        tagged(b"L" if isinstance(v, list) else b"U", str(len(v)).encode())
        for x in v:
            _encode(x, out)
    elif isinstance(v, str):
        tagged(b"S", v.encode("utf-8", "surrogatepass"))
    elif isinstance(v, float):
        tagged(b"F", v.hex().encode())
    else:  # None, bool, int and anything else torch.load gives back
        tagged(b"R", f"{type(v).__name__}:{v!r}".encode())


def save_checked(blob: Mapping[str, Any], path: str | os.PathLike, what: str) -> None:
    """``torch.save`` of ``blob`` with its checksum; a path that cannot be written is a
    ``PPLError``."""
    blob = dict(blob)
    blob[CHECKSUM_KEY] = payload_digest(blob)
    try:
        torch.save(blob, os.fspath(path))
    except (OSError, RuntimeError) as e:
        raise PPLError(f"cannot write the {what} to '{os.fspath(path)}': {_first_line(e)}",
                       hint="give a path in a directory that exists and is writable") from None


def load_checked(path: str | os.PathLike, what: str, hint: str | None = None) -> tuple[dict, bool]:
    """(the dict saved at ``path``, whether it carried a checksum); every way the file can
    be unreadable is a ``PPLError`` naming it. A checksum that does not match the contents
    is an error (the file was changed or damaged after it was written)."""
    p = os.fspath(path)
    hint = hint or f"the file must be one written by the {what}'s save()"
    if not os.path.exists(p):
        raise PPLError(f"no {what} file at '{p}'", hint=hint)
    if os.path.isdir(p):
        raise PPLError(f"'{p}' is a directory, not a saved {what}", hint=hint)
    try:
        size = os.path.getsize(p)
    except OSError as e:
        raise PPLError(f"cannot read the {what} file '{p}': {e.strerror or e}") from None
    if size == 0:
        raise PPLError(f"the {what} file '{p}' is empty (0 bytes)", hint=hint)
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except OSError as e:
        raise PPLError(f"cannot read the {what} file '{p}': {e.strerror or _first_line(e)}") from None
    except Exception as e:  # zip, pickle, EOF, unknown globals: damaged or not ours
        raise PPLError(f"the {what} file '{p}' is damaged, truncated or not a saved {what} "
                       f"({type(e).__name__}: {_first_line(e)})", hint=hint) from None
    if not isinstance(blob, dict):
        raise PPLError(f"'{p}' is not a saved {what} (it holds a {type(blob).__name__}, not a dict)", hint=hint)
    if CHECKSUM_KEY not in blob:
        return blob, False
    if blob[CHECKSUM_KEY] != payload_digest(blob):
        raise PPLError(f"the {what} file '{p}' is corrupt: its contents do not match the checksum stored in it",
                       hint="the file was changed or damaged after it was saved; save it again from the original")
    return blob, True


def check_fields(blob: Mapping[str, Any], fields: Mapping[str, Any], path, what: str) -> None:
    """Each name in ``fields`` is in ``blob`` with a value passing its check: a type, a
    tuple of types, or a (predicate, description) pair."""
    for name, check in fields.items():
        if name not in blob:
            raise PPLError(f"the {what} file '{os.fspath(path)}' has no '{name}' entry",
                           hint=f"the file is damaged or was not written by the {what}'s save()")
        if isinstance(check, tuple) and len(check) == 2 and callable(check[0]) and isinstance(check[1], str):
            ok, desc = check[0](blob[name]), check[1]
        else:
            ok = isinstance(blob[name], check)
            names = check if isinstance(check, tuple) else (check,)
            desc = " or ".join("None" if t is type(None) else t.__name__ for t in names)
        if not ok:
            raise PPLError(f"the {what} file '{os.fspath(path)}' has a bad '{name}' entry: expected {desc}, "
                           f"got {type(blob[name]).__name__}",
                           hint=f"the file is damaged or was not written by the {what}'s save()")


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message, cut after its first sentence when long
    (torch's zip reader explains at length)."""
    lines = str(e).strip().splitlines()
    line = lines[0] if lines else type(e).__name__
    if len(line) > 100 and ". " in line:
        line = line[:line.index(". ")]
    return line
