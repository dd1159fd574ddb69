"""Data positions: the loader state a checkpoint holds, merging it, and adopting it on resume.

A state is a JSON dict: a header (``version``, ``kind``, ``split``, ``seed``, ``block_size``,
``global_rows``, ``names``: the names of the training data, ``config.source_names``), the
position after the last batch returned, and ``tokens``: rows drawn per source times block_size.

- shards: ``epoch``, ``batch`` (global).
- text: ``lanes`` ``{row: [g, epoch, raw, offset]}`` (each process its own rows), ``base``
  ``[g, epoch, raw]`` where lanes without a position start, ``stream``: saved stream positions.
- mixture: ``batch`` and ``sources``, one shards or text position per source.

States of version 1 (no ``version``, ``names`` or ``tokens``) are read as the same position;
their source is taken to be this run's, and a streamed, shuffled source's order from that
version is not reproduced (``resume_data`` decides, as for any change).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

from swamla.data.config import DataError

logger = logging.getLogger(__name__)

VERSION = 2
HEADER = ("kind", "split", "seed", "block_size", "global_rows")


def copy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy with string row keys (JSON's) and int lane positions."""
    out = dict(state)
    if "lanes" in out:
        out["lanes"] = {str(r): [int(v) for v in pos] for r, pos in out["lanes"].items()}
    if "sources" in out and isinstance(out["sources"], list) and out.get("kind") == "mixture":
        out["sources"] = [copy_state(sub) for sub in out["sources"]]
    for key in ("tokens", "stream", "base"):
        if key in out:
            out[key] = _deep(out[key])
    if "names" in out:
        out["names"] = list(out["names"])
    return out


def _deep(value):
    if isinstance(value, dict):
        return {k: _deep(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_deep(v) for v in value]
    return value


def merge_states(states: list[Mapping[str, Any]]) -> dict[str, Any]:
    """One state restoring every process, from each process's ``state_dict()`` of one step."""
    if not states:
        raise DataError("merge_states needs at least one loader state")
    first = states[0]
    for s in states[1:]:
        diff = [k for k in HEADER if s.get(k) != first.get(k)]
        if diff:
            raise DataError(f"loader states disagree on {diff}; merge states of one run and step")
    if first["kind"] == "shards":
        if any((s["epoch"], s["batch"]) != (first["epoch"], first["batch"]) for s in states):
            raise DataError("shard loader states are at different batches; merge states saved "
                            "at the same step")
        return copy_state(first)
    if first["kind"] == "mixture":
        if any(s["batch"] != first["batch"] for s in states):
            raise DataError("mixture loader states are at different batches; merge states saved "
                            "at the same step")
        subs = [_merge_text([s["sources"][i] for s in states]) if "lanes" in sub else sub
                for i, sub in enumerate(first["sources"])]
        return copy_state({**first, "sources": subs})
    return copy_state({**first, **_merge_text(states)})


def _merge_text(states) -> dict[str, Any]:
    lanes: dict[str, list[int]] = {}
    stream: list = []
    for s in states:
        lanes.update(s["lanes"])
        stream.extend(s.get("stream", []))
    return {"lanes": lanes, "stream": stream, "base": states[0].get("base", [0, 0, 0])}


def changes(saved: Mapping[str, Any], header: Mapping[str, Any], *,
            order_changed: bool) -> list[str]:
    """What differs between a saved state and this loader, as ``name: saved -> now`` lines."""
    out = []
    if saved.get("names") is not None and saved["names"] != header["names"]:
        out.append(f"training data {saved['names']} -> {header['names']}")
    for key in HEADER:
        if key != "split" and saved.get(key) != header[key]:
            name = "global batch size (rows)" if key == "global_rows" else key
            out.append(f"{name} {saved.get(key)!r} -> {header[key]!r}")
    if order_changed:
        out.append("stream order (the state was saved by an earlier version, whose order of a "
                   "streamed, shuffled source this version does not reproduce)")
    return out


def refusal(what: list[str]) -> DataError:
    return DataError(
        "the checkpoint's data position does not fit this run's data: " + "; ".join(what)
        + ". Resume with the checkpoint's data flags, or choose: --resume_data continue keeps "
        "the position (the same data at a new path, or another block_size / global batch size "
        "from the same token position), --resume_data restart starts this run's data from its "
        "beginning (see docs/data.md, Resume)")


def token_position(count: int, old_span: int, new_span: int) -> int:
    """The count of ``new_span``-token rows that covers ``count`` rows of ``old_span`` tokens."""
    return math.ceil(count * old_span / new_span)


def regroup_lanes(pos: Mapping[str, Any]) -> dict[str, Any]:
    """A text position for another global batch size: every lane starts over at the earliest
    open document (at most one document per old lane is read again)."""
    if not pos["lanes"]:
        return {**pos, "lanes": {}}
    g, epoch, raw, _ = min(pos["lanes"].values(), key=lambda v: v[0])
    return {"lanes": {}, "base": [g, epoch, raw], "stream": pos.get("stream", [])}
