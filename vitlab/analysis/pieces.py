"""A ``VisionTransformer`` walked piece by piece -- the embedding, each block (with the transition
into its stage), the head -- the one walk behind derived counts, sweeps and the memory prediction.

Each distinct piece is traced once and its cost multiplied: the totals are
``embedding + sum(blocks) + head``, shaped like a full trace's (per-block entries included). The
input of every block is followed through the model (token merging and stage transitions change
it), so blocks alike in structure but fed different shapes are counted apart; the keys are in
``vitlab.analysis.signature``. ``tests/test_flops.py`` and ``tests/test_layout.py`` prove
derived == full on several variants.

What each piece costs is kept in a :class:`PieceCache`: FLOPs (one fvcore trace), the memory
autograd saves, its output shape. Shared across the variants of a sweep (900 variants over width,
heads, depth, MLP ratio and position encoding have ~60 distinct blocks), each piece is traced once,
not once per variant. A piece that changes the forward state (a transition, token merging) is
re-run (no grad) on every visit to get the new state -- its counts are still reused -- so no state
of one model ever reaches another.

Where pieces run: on meta images, on meta stand-ins of the weights (shapes only: a model on any
device is walked without arithmetic or memory; the memory prediction needs this); on real images,
with the model's own weights; with ``real_weights``, a meta model gets zero-filled CPU storage one
block at a time (a component that cannot run on meta tensors, in the memory of one block).
"""
from __future__ import annotations

from contextvars import ContextVar

import functools
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call

from ..state import ForwardState
from .count import Counts, count, materialize, module_kinds
from .memory import PieceMemory, combine, measure_piece, meta_state, training_mode
from .signature import keeps_state, signatures, state_key


@dataclass
class Piece:
    """What one distinct piece costs, whichever model it was first met in."""

    counts: Counts | None = None
    memory: dict[Any, PieceMemory] = field(default_factory=dict)  # by dtype
    out_shape: tuple[int, ...] = ()
    keeps_state: bool = False  # the state out equals the state in (up to the block index)
    tokens_in: int | None = None  # tokens entering the block itself (after a transition)
    first: int | None = None  # block index it was counted at
    stage: str | None = None  # the transition counted with it


class PieceCache:
    """Pieces already counted, keyed by what determines their cost. Share one across the variants
    of a sweep; ``hits`` and ``misses`` say how much was reused."""

    def __init__(self) -> None:
        self.pieces: dict[tuple, Piece] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> Piece | None:
        piece = self.pieces.get(key)
        if piece is None:
            self.misses += 1
        else:
            self.hits += 1
        return piece

    def get_or_add(self, key: tuple) -> Piece:
        return self.get(key) or self.pieces.setdefault(key, Piece())


class _Call(nn.Module):
    """One piece of the model's forward as a module to trace: the model is the child ``model``,
    so its modules trace as ``model.*`` and rename to the model's own names."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.fn(*inputs)


# False while a piece is traced again without the tensors its q/k transform closes over: torch's
# tracer refuses an output that does not depend on the input (a plugin's tables kept as buffers),
# and such constants cost nothing to count anyway
CLOSED_OVER_OUTPUTS: ContextVar[bool] = ContextVar("closed_over_outputs", default=True)


def traced(result: tuple[torch.Tensor, ForwardState]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """What a traced piece must return: the tokens and the tensors its new state carries. A shared
    attention bias computed in the embedding (or recomputed by a transition) feeds later blocks,
    not these tokens, and a trace would drop it as dead code; the full trace counts it."""
    x, state = result
    closed = _closed_over(state.qk_transform) if CLOSED_OVER_OUTPUTS.get() else ()
    extra = tuple(t for t in (state.attn_bias, state.token_weights, *closed) if isinstance(t, torch.Tensor))
    return (x, *extra) if extra else x


def _closed_over(fn, depth: int = 3) -> tuple:
    """The tensors a q/k transform closes over, through the functions it calls (RoPE's sin / cos
    tables, computed once in the embedding for every block): returned by the piece that made them,
    so the trace keeps their cost."""
    out: tuple = ()
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # a cell not filled yet (a name bound later in its function)
            continue
        if isinstance(value, torch.Tensor):
            out += (value,)
        elif callable(value) and depth > 1:
            out += _closed_over(value, depth - 1)
    return out


def _add_renamed(total: Counts, part: Counts, renames: dict[str, str]) -> None:
    """Add ``part`` (traced names: ``model.blocks.3.attn``) to ``total`` under the model's names
    (``blocks.3.attn``), whole-name prefixes swapped by ``renames`` (a counted block standing for
    another: ``blocks.3`` -> ``blocks.7``)."""
    for name, c in part.by_module_op.items():
        if name == "model":  # fvcore counts ancestors inclusively: the root "" already holds it
            continue
        name = name.removeprefix("model.")
        for old, new in renames.items():
            if name == old or name.startswith(old + "."):
                name = new + name[len(old):]
                break
        total.by_module_op.setdefault(name, Counter()).update(c)
    total.unsupported.update(part.unsupported)
    if total.flop_counter is not None and part.flop_counter is not None:
        total.flop_counter += part.flop_counter
    elif part.flop_counter is None:
        total.flop_counter = None


def _span(group: list[int]) -> str:
    if len(group) == 1:
        return f"block {group[0]}"
    if group == list(range(group[0], group[-1] + 1)):
        return f"blocks {group[0]}-{group[-1]}"
    return f"{len(group)} blocks from {group[0]}"


@dataclass
class Walked:
    """One walk's results: counts (or ``None``), the sentence saying how they were derived, the
    tokens entering each stage and leaving the last block (``analysis.token_trace``'s record),
    and the memory of each piece (embedding, [blocks], head) when a dtype was asked for."""

    counts: Counts | None
    note: str
    tokens: dict[Any, int]
    memory: tuple[PieceMemory, list[PieceMemory], PieceMemory] | None


class Walk:
    """One model's walk: FLOPs and per-piece memory, each distinct piece counted once.

    Args:
        model: a ``VisionTransformer`` (any device; counts need it where the images are).
        cache: pieces already counted (default: a fresh cache, this model only).
        second_opinion: also sum ``FlopCounterMode``'s totals (``Report.flop_counter``).
        real_weights: ``model`` is on meta but must run on real weights: the shell and each block
            get zero-filled CPU storage while they run (one block at a time in memory).
    """

    def __init__(self, model: nn.Module, cache: PieceCache | None = None, *, second_opinion: bool = True,
                 real_weights: bool = False):
        self.model = model
        self.cache = cache if cache is not None else PieceCache()
        self.second_opinion = second_opinion
        self.real_weights = real_weights

    def run(self, images: torch.Tensor, *, counts: bool = True, memory: torch.dtype | None = None) -> Walked:
        """Walk once. ``images`` (B, C, H, W) says where pieces run (meta: on stand-ins of the
        weights); ``memory``: the dtype to predict memory at (meta images only). Shapes and FLOPs
        are taken in inference mode, like a full count; memory in training mode."""
        if memory is not None and not images.is_meta:
            raise ValueError("the memory prediction walks meta images")
        with training_mode(self.model, train=False):
            return _Run(self, images, counts, memory).run()


class _Run:
    """The state of one :meth:`Walk.run`: where the pieces run and what has been summed."""

    def __init__(self, walk: Walk, images: torch.Tensor, counts: bool, memory: torch.dtype | None):
        self.options, self.model, self.cache = walk, walk.model, walk.cache
        self.images, self.memory = images, memory
        self.on_meta = images.is_meta
        # memory is read in the dtype asked for; shapes follow it (a bf16 forward)
        self.run_dtype = memory or images.dtype
        self.training = memory is not None  # dropout rates matter to what is saved, not to FLOPs
        self.total = Counts({}, Counter(), 0 if walk.second_opinion else None) if counts else None
        self.parts: list[PieceMemory] = []
        # on meta images, pieces run on meta stand-ins of the weights, also for the shapes: tensors
        # the state carries (RoPE tables) are then the stand-ins' views the memory pass leaves out
        self.direct = not self.on_meta

    @functools.cached_property
    def stand_ins(self) -> dict[str, torch.Tensor]:
        return meta_state(self.model, self.memory, prefix="model.")

    @functools.cached_property
    def skip(self) -> set[int]:
        return {t.untyped_storage()._cdata for t in self.stand_ins.values()}

    @functools.cached_property
    def kinds(self) -> dict[str, str]:
        return module_kinds(self.model)

    # --- running and accounting one piece ------------------------------------------------------

    def blank(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        """An input of ``shape`` where the pieces run (zeros on a real device: no denormals)."""
        dtype = dtype or self.run_dtype
        if self.on_meta:
            return torch.empty(shape, dtype=dtype, device="meta")
        return torch.zeros(shape, dtype=dtype, device=self.images.device)

    def forward(self, fn: Callable[..., Any], *inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            if self.direct:
                return fn(*inputs)
            return functional_call(_Call(self.model, fn), self.stand_ins, inputs)

    def tally(self, piece: Piece, fn: Callable[..., Any], shape: tuple[int, ...], renames: dict[str, str],
              grad: bool = True) -> None:
        """Add ``piece``'s counts (traced on first use) and memory (read on first use at this dtype)."""
        if self.total is not None:
            if piece.counts is None:
                x = self.blank(shape, self.images.dtype)
                try:
                    piece.counts = count(_Call(self.model, fn), (x,), self.options.second_opinion,
                                         registry=self.model.registry)
                except RuntimeError as exc:
                    if "observable data dependence" not in str(exc):
                        raise
                    token = CLOSED_OVER_OUTPUTS.set(False)  # constant tables: traced without them
                    try:
                        piece.counts = count(_Call(self.model, fn), (x,), self.options.second_opinion,
                                             registry=self.model.registry)
                    finally:
                        CLOSED_OVER_OUTPUTS.reset(token)
            _add_renamed(self.total, piece.counts, renames)
        if self.memory is not None:
            if self.memory not in piece.memory:
                x = torch.empty(shape, dtype=self.memory, device="meta", requires_grad=grad)
                wrapper = _Call(self.model, fn)
                with training_mode(self.model):  # dropout masks and the like are saved in training only
                    _, piece.memory[self.memory] = measure_piece(
                        lambda t: functional_call(wrapper, self.stand_ins, (t,)), (x,), wrapper, self.kinds,
                        self.skip, prefix="model.")
            self.parts.append(piece.memory[self.memory])

    def keys(self, *modules: nn.Module | None) -> tuple[tuple, tuple]:
        """The signatures of ``modules`` that group them (inference: what costs FLOPs) and that
        key the cache (training, when memory is read: dropout rates decide what is saved)."""
        both = [(None, None) if m is None else signatures(m) for m in modules]
        grouped = tuple(b[0] for b in both)
        return grouped, (tuple(b[1] for b in both) if self.training else grouped)

    # --- the walk --------------------------------------------------------------------------------

    def run(self) -> Walked:
        model = self.model
        if self.options.real_weights:
            for name, m in model.named_children():
                if name not in ("blocks", "transitions"):
                    materialize(m)
            _materialize_tokens(model)
        shape = tuple(self.images.shape)
        x, state = self.forward(model.embed, self.blank(shape))
        key = ("embed", self.keys(model.patch_embed, model.pos_embed, model.norm_pre)[1],
               tuple(p.shape if p is not None else None for p in (model.cls_token, model.reg_token)), shape)
        self.tally(self.cache.get_or_add(key), lambda im: traced(model.embed(im)), shape, {}, grad=False)

        starts = {p.start: p.index for p in model.spec.stage_plans()}
        tokens: dict[Any, int] = {}
        groups: dict[tuple, list[int]] = {}
        for i in range(len(model.blocks)):
            x, state, group, piece = self.block(i, x, state)
            if i in starts:
                tokens.setdefault(("stage", starts[i]), piece.tokens_in)
            groups.setdefault(group, []).append(i)

        shape = tuple(x.shape)
        key = ("head", self.keys(model.norm, model.pool, model.head)[1], shape)
        self.tally(self.cache.get_or_add(key), lambda t: model.forward_head(model.norm(t)), shape, {})
        tokens["out"] = int(shape[1])
        spans = ", ".join(_span(g) for g in groups.values())
        note = (f"derived: {len(model.blocks)} blocks in {len(groups)} distinct (block, input shape) "
                f"configuration(s) ({spans}); one block of each traced on its own input and multiplied, the "
                "embedding and the head traced once; assumes blocks of equal structure (module types, settings, "
                "parameter shapes) on inputs of equal shape cost the same")
        memory = (self.parts[0], self.parts[1:-1], self.parts[-1]) if self.memory is not None else None
        return Walked(self.total, note, tokens, memory)

    def block(self, i: int, x: torch.Tensor, state: ForwardState):
        """Block ``i`` (with the transition into its stage): ``(tokens out, state out, group, piece)``:
        blocks of one group cost the same FLOPs."""
        model = self.model
        stage = model.stage_starting_at(i)
        parts = [model.blocks[i]] + ([model.transitions[stage]] if stage is not None else [])
        shape = tuple(x.shape)
        grouped, trained = self.keys(parts[0], parts[1] if stage is not None else None)
        acts = model.pos_embed.acts_after(i)
        if acts is not False:  # the traced block includes the encoding's work after it: which encoding is part of the key
            pe = model.pos_embed
            acts = (acts, type(pe).__module__, type(pe).__qualname__, repr(getattr(pe, "params", None)))
        group = ("block", grouped, shape, state_key(state), acts)
        key = group if trained is grouped else (*group, trained)
        piece = self.cache.get(key)
        rerun = piece is None or not piece.keeps_state
        real = self.options.real_weights and (rerun or (self.total is not None and piece.counts is None))
        if real:
            for m in parts:
                materialize(m)
        try:
            if rerun:
                seen: list[int] = []
                hook = model.blocks[i].register_forward_pre_hook(lambda m, a: seen.append(int(a[0].shape[1])))
                try:
                    out, new_state = self.forward(lambda t, st=state: model.run_block(i, t, st), x)
                finally:
                    hook.remove()
                if piece is None:
                    piece = self.cache.pieces[key] = Piece(
                        out_shape=tuple(out.shape), keeps_state=keeps_state(state.replace(block_index=i), new_state),
                        tokens_in=seen[0] if seen else None, first=i, stage=stage)
            else:
                new_state = state.replace(block_index=i)
            renames = {f"blocks.{piece.first}": f"blocks.{i}"}
            if stage is not None and piece.stage is not None:
                renames[f"transitions.{piece.stage}"] = f"transitions.{stage}"
            self.tally(piece, lambda t, st=state: traced(model.run_block(i, t, st)), shape, renames)
        finally:
            if real:
                for m in parts:
                    m.to("meta")  # release the block's memory before the next one
        return self.blank(piece.out_shape), new_state, group, piece


def _materialize_tokens(model: nn.Module) -> None:
    """Class and register tokens are the model's own parameters (not in a child module)."""
    for name in ("cls_token", "reg_token"):
        p = getattr(model, name, None)
        if p is not None and p.is_meta:
            setattr(model, name, nn.Parameter(torch.zeros(p.shape, dtype=p.dtype)))


# --- the memory prediction ------------------------------------------------------------------------

def combine_parts(model, dtype, embed, blocks, head, grad_checkpointing):
    """``memory.combine`` with the model's own parameter bytes (at ``dtype``) and trainable count."""
    tensors = list(model.parameters()) + list(model.buffers())
    params_bytes = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size()) for t in tensors)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return combine(params_bytes, trainable, dtype.itemsize, embed, blocks, head, grad_checkpointing)


def predict_vit(model: nn.Module, images_shape: tuple[int, ...], dtype: torch.dtype | None = None,
                grad_checkpointing: bool = False, cache: PieceCache | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """``(memory, memory_by_kind)`` of a ``VisionTransformer`` (see ``vitlab.analysis.memory``)."""
    dtype = dtype or torch.float32
    walked = Walk(model, cache).run(torch.empty(images_shape, device="meta"), counts=False, memory=dtype)
    return combine_parts(model, dtype, *walked.memory, grad_checkpointing)


def check_inference_fits(spec, batch_size: int, device: str = "cpu") -> None:
    """Refuse, before anything is allocated, a recipe whose predicted inference peak at
    ``batch_size`` does not fit ``device`` (``memory.check_fits``: one line with the estimate)."""
    from ..recipes import build_model
    from .memory import check_fits

    h, w = spec.img_hw
    memory, _ = predict_vit(build_model(spec, device="meta"), (batch_size, spec.in_chans, h, w))
    check_fits(memory["infer_peak_bytes"], f"{spec.name} at batch {batch_size}", device=device)


def train_peak(spec, batch: int, dtype: str = "fp32", grad_checkpointing: bool = False,
               cache: PieceCache | None = None, model=None) -> int:
    """The predicted ``train_peak_bytes`` of ``spec`` at this batch size."""
    from ..recipes import build_model
    from .memory import DTYPES

    model = model if model is not None else build_model(spec, device="meta")
    H, W = spec.img_hw
    cache = cache if cache is not None else PieceCache()
    memory, _ = predict_vit(model, (batch, spec.in_chans, H, W), DTYPES[dtype], grad_checkpointing, cache)
    return memory["train_peak_bytes"]


def largest_batch(spec, budget: int, dtype: str = "fp32", grad_checkpointing: bool = False,
                  cache: PieceCache | None = None) -> int:
    """The largest training batch of ``spec`` whose predicted ``train_peak_bytes`` fits ``budget``."""
    from ..recipes import build_model
    from .memory import largest_fitting_batch

    model = build_model(spec, device="meta")
    cache = cache if cache is not None else PieceCache()
    return largest_fitting_batch(lambda batch: train_peak(spec, batch, dtype, grad_checkpointing, cache, model),
                                 budget)
