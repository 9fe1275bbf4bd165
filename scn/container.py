"""The container every file scn writes shares: safetensors with a JSON header and a checksum.

`.scn` (scn.format), `model.safetensors` (scn.checkpoint) and training checkpoints
(scn.resume) are all safetensors files (no pickle: safe to open from strangers) whose metadata
holds two entries:

- "scn": the JSON header, compact, naming the file's `format` and `version`;
- "scn_sha256": the SHA-256 of the whole file, computed with these 64 hex digits replaced by
  "0" * 64. A reader finds the exact compact text `"scn_sha256":"<64 hex>"` in the safetensors
  header, blanks the digits and hashes the file again (re-serialising the JSON would not give
  the same bytes).

This module writes and checks that envelope (header, checksum, format and version, and that
the file is as long as its safetensors header says) before anything else reads the tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

from scn.errors import FormatError

METADATA_KEY = "scn"
CHECKSUM_KEY = "scn_sha256"
# The JSON headers of real files are a few KB (a 10,000-layer model's would be ~2 MB); a header
# beyond this is refused before it is parsed, so parsing cost stays bounded.
MAX_HEADER_BYTES = 4 << 20
_CHECKSUM_RE = re.compile(rb'"scn_sha256"\s*:\s*"([0-9a-f]{64})"')
# What each format is called in messages, and how to make one.
KINDS = {
    "scn": ("a .scn model file", "written by scn.save (or a run's model.scn)", ".scn"),
    "scn-checkpoint": ("a model checkpoint (model.safetensors)",
                       "written at the end of every scn-train run", "model checkpoint"),
    "scn-train-state": ("a training checkpoint", "written by scn-train while it trains",
                        "training checkpoint"),
}


def _plain(x):
    """JSON for tensors and arrays a header may hold."""
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"cannot write {type(x).__name__} into an scn header")


def write(save: Callable[..., bytes], tensors: dict, header: dict, allow_nan: bool = False) -> bytes:
    """The file's bytes: `save(tensors, metadata=...)` (safetensors' numpy or torch `save`)
    with `header` and the checksum in its metadata. `allow_nan` lets a training checkpoint's
    metrics rows hold NaN; model files never do."""
    meta = {METADATA_KEY: json.dumps(header, separators=(",", ":"), allow_nan=allow_nan, default=_plain),
            CHECKSUM_KEY: "0" * 64}
    raw = bytearray(_sorted_header(save(tensors, metadata=meta)))
    n = int.from_bytes(raw[:8], "little")
    found = list(_CHECKSUM_RE.finditer(raw, 8, 8 + n))
    assert len(found) == 1, "safetensors wrote the metadata in an unexpected way"
    start, end = found[0].span(1)
    raw[start:end] = hashlib.sha256(raw).hexdigest().encode()
    return bytes(raw)


def _sorted_header(raw: bytes) -> bytes:
    """`raw` with its safetensors header written with sorted keys: safetensors keeps metadata in
    a hash map whose order changes from process to process, and a file should be a function of
    its contents. Offsets count from the end of the header, so the data stays as it is."""
    n = int.from_bytes(raw[:8], "little")
    text = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # padded with spaces to a multiple of 8, as safetensors does
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def foreign(name: str, fmt: str, why: str) -> FormatError:
    what, how, _ = KINDS[fmt]
    return FormatError(f"{name} is not {what}: {why}. Check the path; such files are {how}.")


def split(raw: bytes, name: str, fmt: str) -> tuple[int, dict]:
    """The safetensors header (its length and parsed JSON), with clear errors."""
    if len(raw) < 8:
        raise foreign(name, fmt, f"it is only {len(raw)} bytes long (empty or truncated)")
    n = int.from_bytes(raw[:8], "little")
    looks_safetensors = raw[8:9] == b"{"
    if n > MAX_HEADER_BYTES:
        if not looks_safetensors:
            raise foreign(name, fmt, "it does not start with a safetensors header")
        raise FormatError(f"{name} declares a header of {n:,} bytes, beyond the "
                          f"{MAX_HEADER_BYTES:,} any scn file needs; it is not a file scn wrote, or "
                          "it is corrupt.")
    if n > len(raw) - 8:
        if looks_safetensors:
            raise FormatError(f"{name} is truncated: its header alone should be {n} bytes but the "
                              f"file has {len(raw)}. Copy or download it again.")
        raise foreign(name, fmt, "it does not start with a safetensors header")
    try:
        st_header = json.loads(raw[8:8 + n].decode("utf-8"))
        if not isinstance(st_header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if looks_safetensors:
            raise FormatError(f"{name} is corrupt: its safetensors header is not valid JSON "
                              f"({exc}). Copy or download it again.") from None
        raise foreign(name, fmt, "it does not start with a safetensors header") from None
    return n, st_header


def _finite_json(text):
    """JSON that refuses NaN, Infinity and numbers beyond float range (1e400)."""
    def number(token: str) -> float:
        value = float(token)
        if not math.isfinite(value):
            raise ValueError(f"the number {token} is out of range")
        return value

    def constant(token: str):
        raise ValueError(f"{token} is not a number a header may hold")

    return json.loads(text, parse_float=number, parse_constant=constant)


def header_of(raw: bytes, name: str, fmt: str, version: int | tuple[int, ...],
              finite: bool = True) -> tuple[dict, int, dict]:
    """(scn header, safetensors header length, safetensors header), format and version checked.

    With `finite` (model files), a header number that is NaN, infinite or beyond float range is
    a FormatError here, before anything is built from it."""
    n, st_header = split(raw, name, fmt)
    meta = st_header.get("__metadata__") or {}
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        raise foreign(name, fmt, "it is a safetensors file without scn's 'scn' metadata")
    try:
        header = (_finite_json if finite else json.loads)(meta[METADATA_KEY])
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (TypeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{name} is corrupt: its 'scn' header is not valid JSON ({exc}). "
                          "Copy or download it again.") from None
    found = header.get("format")
    if found != fmt:
        if isinstance(found, str) and found in KINDS:
            raise FormatError(f"{name} is {KINDS[found][0]}, not {KINDS[fmt][0]}." + _hint(found, fmt))
        raise foreign(name, fmt, f"its header names the format {found!r}")
    versions = version if isinstance(version, tuple) else (version,)
    found_version = header.get("version")
    if isinstance(found_version, bool) or found_version not in versions:
        known = " or ".join(str(v) for v in versions)
        raise FormatError(f"{name} is version {found_version!r} of the {KINDS[fmt][2]} format; this "
                          f"scn reads version {known}. Use the scn release that wrote it (or "
                          f"upgrade scn); if the file should be version {known}, it is corrupt.")
    return header, n, st_header


def tensor_bytes(st_header: dict, name: str) -> dict[str, int]:
    """Each tensor's size in bytes, from a safetensors header (`split`'s)."""
    try:
        return {key: int(entry["data_offsets"][1]) - int(entry["data_offsets"][0])
                for key, entry in st_header.items() if key != "__metadata__"}
    except (TypeError, KeyError, IndexError, ValueError):
        raise FormatError(f"{name} is corrupt: its safetensors header is malformed.") from None


def _hint(found: str, wanted: str) -> str:
    if found == "scn-checkpoint" and wanted == "scn":
        return (" Load it with scn.checkpoint.load_checkpoint and pack it with "
                "scn.save(model, 'model.scn', header['dataset']).")
    return ""


def verify(raw: bytes, name: str, n: int, st_header: dict) -> None:
    """Check that the file is whole (as long as its tensors' offsets say) and unaltered."""
    try:
        end = max([int(v["data_offsets"][1]) for k, v in st_header.items() if k != "__metadata__"],
                  default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise FormatError(f"{name} is corrupt: its safetensors header is malformed.") from None
    if 8 + n + end > len(raw):
        raise FormatError(f"{name} is truncated: it should be {8 + n + end} bytes but has "
                          f"{len(raw)}. Copy or download it again.")
    found = list(_CHECKSUM_RE.finditer(raw, 8, 8 + n))
    if len(found) != 1:
        raise FormatError(f"{name} is corrupt: its checksum ({CHECKSUM_KEY}) is missing or "
                          "damaged. Copy or download it again.")
    start, stop = found[0].span(1)
    blank = raw[:start] + b"0" * 64 + raw[stop:]
    if hashlib.sha256(blank).hexdigest().encode() != raw[start:stop]:
        raise FormatError(f"{name} is corrupt: its contents do not match their SHA-256 checksum "
                          "(a damaged or edited file). Copy or download it again.")


def read(path: str | Path, fmt: str, version: int, finite: bool = True) -> tuple[dict, bytes]:
    """A whole file, checked (envelope, format, version, checksum): (scn header, raw bytes)."""
    raw = read_bytes(path)
    header, n, st_header = header_of(raw, str(path), fmt, version, finite)
    verify(raw, str(path), n, st_header)
    return header, raw


def read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise FormatError(f"cannot read {path}: {exc.strerror or exc}.") from None


def read_head(path: str | Path) -> bytes:
    """The first 8 bytes and the safetensors header they announce (at most the whole file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            return head + f.read(max(min(n, os.fstat(f.fileno()).st_size - 8), 0))
    except OSError as exc:
        raise FormatError(f"cannot read {path}: {exc.strerror or exc}.") from None
