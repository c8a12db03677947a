"""Shards for ``compare --merge``: the JSON outputs of earlier runs, read as untrusted data.

A shard is checked before any of it is used: a regular file (not a FIFO or ``/dev/zero``) of at
most ``MAX_SHARD_BYTES``, JSON without ``NaN``, ``Infinity``, repeated keys or nesting past a few
levels, and then every row against ``ShardRow`` (types, finite and bounded numbers). Joining
shards refuses, naming both files, a variant given twice with different results and shards made
with different settings (batch size, dtype, image size, counting method, gradient checkpointing).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from ..errors import VitlabError, one_line, path_label
from ..fileio import check_input
from .memory import MAX_BATCH, MAX_BYTES

MAX_SHARD_BYTES = 64 * 2**20  # 64 MiB: tens of thousands of variants
MAX_SHARD_NESTING = 8  # a row is a list of objects of objects; nothing deeper is written
MAX_NAME = 1000  # characters of a variant name, a kind or an operator

Count = Annotated[StrictInt, Field(ge=0, le=10**21)]  # FLOPs, params, tokens: far above any model
Bytes = Annotated[StrictInt, Field(ge=0, le=MAX_BYTES)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Ms = Annotated[float, Field(ge=0, le=1e12)]
Pct = Annotated[float, Field(ge=-1e9, le=1e12)]
Side = Annotated[StrictInt, Field(ge=1, le=2**16)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=False)


class Measured(_Model):
    """``measured`` of a row (``vitlab.measure``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    device: Annotated[str, Field(max_length=64)]
    batch_size: Annotated[StrictInt, Field(ge=1, le=MAX_BATCH)]
    infer_ms: Optional[Ms] = None
    train_step_ms: Optional[Ms] = None
    infer_peak_bytes: Optional[Bytes] = None
    train_peak_bytes: Optional[Bytes] = None
    infer_ms_spread: Optional[Annotated[float, Field(ge=0, le=1e9)]] = None
    train_step_ms_spread: Optional[Annotated[float, Field(ge=0, le=1e9)]] = None
    halved_from: Optional[Annotated[StrictInt, Field(ge=1, le=MAX_BATCH)]] = None
    note: Optional[Annotated[str, Field(max_length=MAX_NAME)]] = None
    warning: Optional[Annotated[str, Field(max_length=MAX_NAME)]] = None


class ShardRow(_Model):
    """One row of ``vitlab compare --format json``: a report and its change against the baseline."""

    name: Name
    flops: Count
    params: Count
    trainable_params: Count
    tokens: Optional[Count]
    activations: Count
    img_size: tuple[Side, Side]
    batch_size: Annotated[StrictInt, Field(ge=1, le=MAX_BATCH)]
    by_kind: dict[Name, Count]
    by_module: dict[Name, Count]
    by_operator: dict[Name, Count] = {}
    unsupported: dict[Name, Count] = {}
    free_ops: dict[Name, Count] = {}
    free_why: dict[Name, Annotated[str, Field(max_length=MAX_NAME)]] = {}
    flop_counter: Optional[Count] = None
    derived: StrictBool = False
    derivation: Optional[Annotated[str, Field(max_length=10 * MAX_NAME)]] = None
    method: Literal["full", "derived", "auto"] = "full"
    device: Annotated[str, Field(max_length=64)] = "meta"
    stage_tokens: Annotated[list[Count], Field(max_length=10_000)] = []
    tokens_out: Optional[Count] = None
    memory: dict[Name, Bytes] = {}
    memory_by_kind: dict[Name, Bytes] = {}
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    grad_checkpointing: StrictBool = False
    fit: Optional[dict[Literal["budget_bytes", "batch_size"], Bytes]] = None
    measured: Optional[Measured] = None
    baseline: Optional[Name] = None
    d_flops_pct: Optional[Pct] = Field(None, alias="d_flops_%")
    d_params_pct: Optional[Pct] = Field(None, alias="d_params_%")

    def report_data(self) -> dict[str, Any]:
        """The fields of a ``Report``, as ``Report.from_dict`` takes them."""
        data = self.model_dump(exclude={"baseline", "d_flops_pct", "d_params_pct"})
        if self.measured is not None:
            data["measured"] = self.measured.model_dump(exclude_none=True)
        return data

    def settings(self) -> dict[str, Any]:
        """What must agree between shards for their rows to be one comparison."""
        return {"batch size": self.batch_size, "dtype": self.dtype, "image size": "x".join(map(str, self.img_size)),
                "method": "full" if self.method == "full" else "derived", "grad checkpointing": self.grad_checkpointing}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number vitlab writes")


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {one_line(key[:40])!r} appears twice in one object")
    return out


def _nesting(text: str) -> int:
    """The deepest ``[``/``{`` nesting of JSON ``text`` outside strings, in one pass."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def read_shard(path: str | os.PathLike) -> list[ShardRow]:
    """The rows of one shard, checked; ``VitlabError`` (one line naming the file) if anything is off."""
    label = path_label(path)
    check_input(path, "--merge: shard")  # a regular file: a FIFO would block, /dev/zero never end
    try:
        st = os.stat(path)
        if st.st_size > MAX_SHARD_BYTES:
            raise VitlabError(f"--merge: {label} is {st.st_size:,} bytes; a shard is at most {MAX_SHARD_BYTES:,} bytes")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_SHARD_BYTES + 1)  # the file may have grown since stat
    except OSError as exc:
        raise VitlabError(f"--merge: cannot read {label}: {exc.strerror or exc}") from None
    if len(raw) > MAX_SHARD_BYTES:
        raise VitlabError(f"--merge: {label} is more than {MAX_SHARD_BYTES:,} bytes; a shard is at most that")
    not_ours = f"--merge: {label} is not a 'vitlab compare --format json' output"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise VitlabError(f"{not_ours} (not UTF-8 text)") from None
    if _nesting(text) > MAX_SHARD_NESTING:
        raise VitlabError(f"{not_ours} (nested deeper than {MAX_SHARD_NESTING} levels)")
    try:
        data = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_no_repeats)
    except json.JSONDecodeError as exc:
        raise VitlabError(f"{not_ours} (invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # NaN, a repeated key, an integer of thousands of digits
        raise VitlabError(f"{not_ours} ({one_line(str(exc))[:200]})") from None
    if not isinstance(data, list) or not data:
        raise VitlabError(f"{not_ours} (a non-empty list of variant objects)")
    rows = []
    for i, row in enumerate(data):
        try:
            rows.append(ShardRow.model_validate(row))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in (i, *err["loc"]))
            raise VitlabError(f"{not_ours}: [{where}] {one_line(err['msg'])[:200]}") from None
    return rows


def join(paths: Sequence[str | os.PathLike]) -> tuple[list[dict[str, Any]], Optional[str]]:
    """The report data of every variant of the shards at ``paths``, each once in order of first
    appearance, and the baseline they were compared against. Refuses, naming both files, a variant
    given twice with different results and shards made with different settings."""
    first: dict[str, tuple[str, ShardRow]] = {}
    settings: Optional[tuple[str, dict[str, Any]]] = None
    baseline = None
    for path in paths:
        label = path_label(path)
        for row in read_shard(path):
            if settings is None:
                settings = (label, row.settings())
            elif row.settings() != settings[1]:
                ours, theirs = row.settings(), settings[1]
                what = next(k for k in ours if ours[k] != theirs[k])
                raise VitlabError(f"--merge: {label} and {settings[0]} were made with different settings "
                                  f"({what} {ours[what]} and {theirs[what]}); merge shards of one run")
            baseline = baseline or row.baseline
            seen = first.get(row.name)
            if seen is None:
                first[row.name] = (label, row)
            elif seen[1].report_data() != row.report_data():
                raise VitlabError(f"--merge: variant {one_line(row.name[:80])!r} is in {seen[0]} and {label} "
                                  "with different results; give each variant once")
    return [row.report_data() for _, row in first.values()], baseline
