"""safetensors files from users, checked before they are read: a hostile or damaged file is a
one-line error, never a huge allocation or a crash deep inside the reader.

The format is an 8-byte little-endian header length, that many bytes of JSON
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``), then the data.
:func:`check_safetensors` parses the header with the standard library and refuses what the
format forbids (or what saelab's readers cannot take) before any tensor is touched:
a header larger than :data:`MAX_HEADER_BYTES` or than the file, a header that is not a JSON
object, unknown or unaccepted dtypes, shapes whose size is not the span of their offsets, and
offsets that overlap, leave gaps or point past the file. :func:`read_tensors` then loads the
tensors, and :func:`check_finite` refuses NaN and Inf weights.

Example::

    tensors = read_tensors(path, dtypes=FLOAT_DTYPES, fix="re-save the SAE with saelab")
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from saelab.errors import SaelabError

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The largest header accepted (safetensors' own limit): a header is names and shapes, so even a
model with a million tensors stays far below it."""

DTYPE_BYTES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
"""Every dtype of the safetensors format with its size in bytes."""

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
"""Weights: SAEs and steering vectors are read as float32 from any of these."""
NUMBER_DTYPES = (*FLOAT_DTYPES, "I64", "I32", "I16", "I8", "U8", "BOOL")
"""Tensors that may also hold counts or ids (feature statistics, ``k`` buffers)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as its header describes it; ``start``/``end`` are offsets into the data."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def check_safetensors(
    path: str | Path, *, fix: str, dtypes: Collection[str] | None = None
) -> dict[str, TensorEntry]:
    """The tensors the header of ``path`` describes, after checking it against the file.

    Reads only the header. ``dtypes`` (safetensors names, e.g. :data:`FLOAT_DTYPES`) are those
    the caller can use; ``fix`` ends every message (what the user should do about the file).
    """
    path = Path(path)

    def bad(what: str) -> SaelabError:
        return SaelabError(f"{path} is corrupt or truncated: {what}; {fix}")

    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise bad(f"it has {size} bytes, too few for the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise bad(
                    f"its header claims {n:,} bytes, more than the {MAX_HEADER_BYTES:,} allowed"
                )
            if 8 + n > size:
                raise bad(f"its header claims {n:,} bytes but the file has only {size:,}")
            raw = handle.read(n)
    except OSError as exc:
        raise SaelabError(f"cannot read {path} ({exc.strerror or exc}); {fix}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"its header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise bad("its __metadata__ is not an object of strings")
    data_bytes = size - 8 - n
    entries = {
        name: _entry(path, name, info, data_bytes, dtypes, fix, bad)
        for name, info in header.items()
    }
    # The data must be exactly the tensors, back to back: no overlap (two tensors sharing
    # bytes), no gap and nothing past the end.
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != position:
            what = "overlaps the tensor before it" if entry.start < position else "leaves a gap"
            raise bad(f"tensor {name!r} starts at byte {entry.start:,} and {what}")
        position = entry.end
    if position != data_bytes:
        raise bad(f"its tensors cover {position:,} bytes of data but the file holds {data_bytes:,}")
    return entries


def _entry(
    path: Path,
    name: str,
    info: object,
    data_bytes: int,
    dtypes: Collection[str] | None,
    fix: str,
    bad: Callable[[str], SaelabError],
) -> TensorEntry:
    if not isinstance(info, dict):
        raise bad(f"tensor {name!r} is described by a {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
    if dtypes is not None and dtype not in dtypes:
        raise SaelabError(
            f"{path}: tensor {name!r} has dtype {dtype}, which saelab cannot use here "
            f"(it reads {', '.join(dtypes)}); {fix}"
        )
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise bad(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
        raise bad(f"tensor {name!r} has data_offsets {offsets!r}, not two non-negative integers")
    start, end = offsets
    if start > end:
        raise bad(f"tensor {name!r} has data_offsets [{start}, {end}] that end before they start")
    if end > data_bytes:
        raise bad(
            f"tensor {name!r} has data_offsets [{start}, {end}] outside the {data_bytes:,} bytes "
            "of data"
        )
    elements = 0 if 0 in shape else 1
    for dim in shape if elements else ():
        # Stop as soon as the shape cannot fit: a hostile shape's product can be astronomical.
        elements *= dim
        if elements * DTYPE_BYTES[dtype] > data_bytes:
            raise bad(
                f"tensor {name!r} claims shape {shape}, more than the {data_bytes:,} bytes of data"
            )
    if elements * DTYPE_BYTES[dtype] != end - start:
        raise bad(
            f"tensor {name!r} is {dtype} {shape} ({elements * DTYPE_BYTES[dtype]:,} bytes) but its "
            f"data_offsets span {end - start:,} bytes"
        )
    return TensorEntry(dtype, tuple(shape), start, end)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_tensors(
    path: str | Path, *, fix: str, dtypes: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of ``path``, after :func:`check_safetensors`; any failure is one line."""
    path = Path(path)
    check_safetensors(path, fix=fix, dtypes=dtypes)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types, or OSError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SaelabError(f"{path} is corrupt or truncated ({reason}); {fix}") from exc


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | Path, *, fix: str) -> None:
    """One-line error naming the first floating-point tensor that holds a NaN or an Inf."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            what = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise SaelabError(f"tensor {name!r} in {path} holds {what} values; {fix}")
