"""Kaggle run-length encoding: ``"start length start length ..."`` with 1-indexed starts.

    from medseg.data.rle import encode, decode
    s = encode(mask)                      # mask [h, w], any dtype, nonzero = foreground
    m = decode(s, (h, w))                 # uint8 0/1
    encode(mask, order="F")               # column-major (some Kaggle competitions)

UW-Madison GI tract uses ``order="C"`` (the slice flattened row by row). An empty mask is ``""``.
Both directions are vectorised (no Python loop over pixels or runs); ``decode`` validates the string
and raises ``MedsegError`` naming the run and position at fault, and the file/row given as ``where``/``row``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import numpy as np

from medseg.errors import MedsegError

Order = Literal["C", "F"]

_WELL_FORMED = re.compile(r"\s*\d+(?:\s+\d+)*\s*")
_TOKEN = re.compile(r"\d+")


def _check_order(order: str) -> None:
    if order not in ("C", "F"):
        raise MedsegError(f"RLE order must be 'C' (row-major) or 'F' (column-major), got {order!r}")


def encode(mask: np.ndarray, order: Order = "C") -> str:
    """RLE of ``mask`` (nonzero = foreground) flattened in ``order``; ``""`` when the mask is empty."""
    _check_order(order)
    flat = np.asarray(mask).ravel(order=order) != 0
    if not flat.any():
        return ""
    # pad with background so every run has a rising and a falling edge
    padded = np.empty(flat.size + 2, dtype=np.int8)
    padded[0] = padded[-1] = 0
    padded[1:-1] = flat
    edges = np.flatnonzero(np.diff(padded))  # 0-indexed: starts at even positions, ends at odd
    runs = edges.reshape(-1, 2)
    runs[:, 1] -= runs[:, 0]  # end -> length
    runs[:, 0] += 1  # 1-indexed start
    return " ".join(runs.ravel().astype(str).tolist())


def _is_empty(rle: object) -> bool:
    if rle is None:
        return True
    if isinstance(rle, float) and math.isnan(rle):  # pandas reads an empty cell as NaN
        return True
    return isinstance(rle, str) and not rle.strip()


def _fail(message: str, where: str | Path | None, row: str | None) -> MedsegError:
    return MedsegError(f"bad RLE for {row}: {message}" if row else f"bad RLE: {message}", where)


def parse(
    rle: str | None,
    size: int | None = None,
    *,
    where: str | Path | None = None,
    row: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``rle`` and return (0-indexed starts, lengths) as int64 arrays.

    ``size`` (pixels in the image) enables the past-the-end check. ``where`` (a file) and ``row``
    (e.g. ``"id case1_day1_slice_0001, class stomach"``) only make the error message precise.
    """
    if _is_empty(rle):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not isinstance(rle, str):
        raise _fail(f"expected a string, got {type(rle).__name__}", where, row)
    if not _WELL_FORMED.fullmatch(rle):
        tokens = rle.split()
        bad = next(i for i, t in enumerate(tokens) if not _TOKEN.fullmatch(t))
        raise _fail(
            f"token {bad + 1} ({tokens[bad]!r}) is not a non-negative integer (run {bad // 2 + 1})", where, row
        )
    nums = np.array(rle.split(), dtype=np.int64)
    if nums.size % 2:
        raise _fail(f"odd number of values ({nums.size}): the last start ({nums[-1]}) has no length", where, row)
    starts, lengths = nums[0::2] - 1, nums[1::2]
    bad = np.flatnonzero(starts < 0)
    if bad.size:
        i = int(bad[0])
        raise _fail(f"run {i + 1}: start {starts[i] + 1} must be >= 1 (starts are 1-indexed)", where, row)
    bad = np.flatnonzero(lengths <= 0)
    if bad.size:
        i = int(bad[0])
        raise _fail(f"run {i + 1} (start {starts[i] + 1}): length {lengths[i]} must be >= 1", where, row)
    ends = starts + lengths  # exclusive, 0-indexed
    bad = np.flatnonzero(starts[1:] <= starts[:-1])
    if bad.size:
        i = int(bad[0]) + 1
        raise _fail(
            f"run {i + 1}: start {starts[i] + 1} is not after run {i}'s start {starts[i - 1] + 1} "
            "(starts must be strictly increasing)",
            where,
            row,
        )
    bad = np.flatnonzero(starts[1:] < ends[:-1])
    if bad.size:
        i = int(bad[0]) + 1
        raise _fail(
            f"run {i + 1} (start {starts[i] + 1}) overlaps run {i} (start {starts[i - 1] + 1}, "
            f"length {lengths[i - 1]}, last pixel {ends[i - 1]})",
            where,
            row,
        )
    if size is not None and ends[-1] > size:
        i = ends.size - 1
        raise _fail(
            f"run {i + 1} (start {starts[i] + 1}, length {lengths[i]}) ends at pixel {ends[i]}, "
            f"past the image end ({size} pixels)",
            where,
            row,
        )
    return starts, lengths


def validate(rle: str | None, size: int | None = None, *, where: str | Path | None = None, row: str | None = None) -> int:
    """Raise MedsegError if ``rle`` is malformed (or runs past ``size``); return its foreground pixel count."""
    return int(parse(rle, size, where=where, row=row)[1].sum())


def decode(
    rle: str | None,
    shape: tuple[int, int],
    order: Order = "C",
    *,
    where: str | Path | None = None,
    row: str | None = None,
) -> np.ndarray:
    """The uint8 0/1 mask of ``shape`` (height, width) encoded by ``rle`` in ``order``."""
    _check_order(order)
    h, w = int(shape[0]), int(shape[1])
    size = h * w
    starts, lengths = parse(rle, size, where=where, row=row)
    if not starts.size:
        return np.zeros((h, w), np.uint8)
    # +1 at each start, -1 after each end, cumulative sum = inside a run (runs never overlap)
    delta = np.zeros(size + 1, np.int8)
    delta[starts] = 1
    delta[starts + lengths] -= 1  # an end may coincide with the next start: 1 - 1 = 0, still right
    flat = np.cumsum(delta[:-1], dtype=np.int8).view(np.uint8)
    return flat.reshape((h, w), order=order) if order == "C" else np.ascontiguousarray(flat.reshape((h, w), order="F"))
