"""A ``VisionTransformer`` walked piece by piece -- the embedding, each block (with the transition
into its stage), the head -- with what each distinct piece costs kept in a :class:`PieceCache`
shared across variants: FLOPs (one fvcore trace), the memory autograd saves, its output shape.

This is the derived count of ``vitlab.analysis.derived`` (same keys: ``block_signature``, input
shape, ``_state_key``), made to reuse pieces across models: a sweep of 900 variants over width,
heads, depth, MLP ratio and position encoding has ~60 distinct blocks, so each is traced once, not
once per variant. Everything runs on meta stand-ins of the model's weights (shapes only), so a
model on any device is walked without arithmetic or memory.

A piece that changes the forward state (a transition, token merging) is re-run (no grad, meta) on
every visit to get the new state -- its counts are still reused -- so no state of one model ever
reaches another.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..state import ForwardState
from .count import Counts, count, module_kinds
from .derived import _add, _Call, _renamer, _span, _state_key, block_signature, traced
from .memory import PieceMemory, combine, measure_piece, meta_state, training_mode


@dataclass
class _Piece:
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
        self.pieces: dict[tuple, _Piece] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> _Piece | None:
        piece = self.pieces.get(key)
        if piece is None:
            self.misses += 1
        else:
            self.hits += 1
        return piece


def signature(module: nn.Module) -> tuple:
    """``derived.block_signature`` for training memory: types, settings (dropout rates as zero or
    not) and shapes -- the same key within and across models."""
    return block_signature(module, training=True)


def _signatures(*modules: nn.Module | None) -> tuple:
    return tuple(None if m is None else signature(m) for m in modules)


def _keeps(before: ForwardState, after: ForwardState) -> bool:
    return (after.grid == before.grid and after.num_prefix == before.num_prefix and after.num_tokens == before.num_tokens
            and after.qk_transform is before.qk_transform and after.attn_bias is before.attn_bias
            and after.token_weights is before.token_weights)


class Walk:
    """One model's walk: FLOPs (optional) and per-piece memory at ``dtype``."""

    def __init__(self, model: nn.Module, cache: PieceCache | None = None, dtype: torch.dtype | None = None,
                 want_counts: bool = False, second_opinion: bool = True):
        from torch.func import functional_call

        self.model = model
        self.cache = cache if cache is not None else PieceCache()
        self.dtype = dtype or torch.float32
        self.want_counts = want_counts
        self.second_opinion = second_opinion
        self.state = meta_state(model, self.dtype, prefix="model.")
        self.skip = {t.untyped_storage()._cdata for t in self.state.values()}
        self.kinds = module_kinds(model)
        self._functional_call = functional_call

    def _run(self, fn: Callable[..., Any], *inputs: torch.Tensor) -> Any:
        """``fn`` on the meta stand-ins of the weights."""
        return self._functional_call(_Call(self.model, fn), self.state, inputs)

    def _memory(self, piece: _Piece, fn: Callable[..., Any], x: torch.Tensor) -> PieceMemory:
        if self.dtype not in piece.memory:
            wrapper = _Call(self.model, fn)
            with training_mode(self.model):  # dropout masks and the like are saved in training only
                _, piece.memory[self.dtype] = measure_piece(
                    lambda t: self._functional_call(wrapper, self.state, (t,)), (x,), wrapper, self.kinds, self.skip,
                    prefix="model.")
        return piece.memory[self.dtype]

    def _count(self, piece: _Piece, fn: Callable[..., Any], shape: tuple[int, ...]) -> Counts:
        if piece.counts is None:
            x = torch.empty(shape, device="meta")
            piece.counts = count(_Call(self.model, fn), (x,), self.second_opinion, registry=self.model.registry)
        return piece.counts

    def run(self, images_shape: tuple[int, ...], tokens: dict | None = None):
        """Walk once: ``(counts or None, note, memory parts (embed, [blocks], head))``. Shapes and
        FLOPs are taken in inference mode, like a full count; memory in training mode."""
        with training_mode(self.model, train=False):
            return self._run_all(images_shape, tokens)

    def _run_all(self, images_shape, tokens):
        model = self.model
        starts = {p.start: p.index for p in model.spec.stage_plans()}
        total = Counts({}, Counter(), 0 if self.second_opinion else None)
        x_img = torch.empty(images_shape, dtype=self.dtype, device="meta")

        embed_fn = lambda im: traced(model.embed(im))  # noqa: E731
        with torch.no_grad():
            x, state = self._run(lambda im: model.embed(im), x_img)
        key = ("embed", _signatures(model.patch_embed, model.pos_embed, model.norm_pre),
               tuple(p.shape if p is not None else None for p in (model.cls_token, model.reg_token)), images_shape)
        embed = self.cache.get(key) or self.cache.pieces.setdefault(key, _Piece())
        embed_mem = self._memory(embed, embed_fn, x_img)
        if self.want_counts:
            _add(total, self._count(embed, embed_fn, images_shape), _renamer({}))

        blocks: list[PieceMemory] = []
        groups: dict[tuple, list[int]] = {}
        for i in range(len(model.blocks)):
            stage = model._transition_at.get(i)
            key = ("block", signature(model.blocks[i]), tuple(x.shape), _state_key(state),
                   model.pos_embed.acts_after(i), None if stage is None else signature(model.transitions[stage]))
            piece = self.cache.get(key)
            block_fn = lambda t, i=i, st=state: traced(model.run_block(i, t, st))  # noqa: E731
            if piece is None or not piece.keeps_state:
                seen: list[int] = []
                hook = model.blocks[i].register_forward_pre_hook(lambda m, a: seen.append(int(a[0].shape[1])))
                try:
                    with torch.no_grad():
                        out, new_state = self._run(lambda t, i=i, st=state: model.run_block(i, t, st), x)
                finally:
                    hook.remove()
                if piece is None:
                    piece = self.cache.pieces[key] = _Piece(
                        out_shape=tuple(out.shape), keeps_state=_keeps(state.replace(block_index=i), new_state),
                        tokens_in=seen[0] if seen else None, first=i, stage=stage)
            else:
                new_state = state.replace(block_index=i)
            xb = torch.empty(tuple(x.shape), dtype=self.dtype, device="meta", requires_grad=True)
            blocks.append(self._memory(piece, block_fn, xb))
            if self.want_counts:
                one = self._count(piece, block_fn, tuple(x.shape))
                renames = {f"blocks.{piece.first}": f"blocks.{i}"}
                if stage is not None and piece.stage is not None:
                    renames[f"transitions.{piece.stage}"] = f"transitions.{stage}"
                _add(total, one, _renamer(renames))
            if tokens is not None and i in starts:
                tokens.setdefault(("stage", starts[i]), piece.tokens_in)
            groups.setdefault(key, []).append(i)
            x = torch.empty(piece.out_shape, dtype=self.dtype, device="meta")
            state = new_state

        head_fn = lambda t: model.forward_head(model.norm(t))  # noqa: E731
        key = ("head", _signatures(model.norm, model.pool, model.head), tuple(x.shape))
        head = self.cache.get(key) or self.cache.pieces.setdefault(key, _Piece())
        head_mem = self._memory(head, head_fn, torch.empty(tuple(x.shape), dtype=self.dtype, device="meta",
                                                           requires_grad=True))
        if self.want_counts:
            _add(total, self._count(head, head_fn, tuple(x.shape)), _renamer({}))
        if tokens is not None:
            tokens.setdefault("out", int(x.shape[1]))
        spans = ", ".join(_span(g) for g in groups.values())
        note = (f"derived: {len(model.blocks)} blocks in {len(groups)} distinct (block, input shape) "
                f"configuration(s) ({spans}); one block of each traced on its own input and multiplied, the "
                "embedding and the head traced once; assumes blocks of equal structure (module types, settings, "
                "parameter shapes) on inputs of equal shape cost the same")
        return (total if self.want_counts else None), note, (embed_mem, blocks, head_mem)


def predict_vit(model: nn.Module, images_shape: tuple[int, ...], dtype: torch.dtype | None = None,
                grad_checkpointing: bool = False, cache: PieceCache | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """``(memory, memory_by_kind)`` of a ``VisionTransformer`` (see ``vitlab.analysis.memory``)."""
    dtype = dtype or torch.float32
    _, _, (embed, blocks, head) = Walk(model, cache, dtype).run(images_shape)
    return combine_parts(model, dtype, embed, blocks, head, grad_checkpointing)


def check_inference_fits(spec, batch_size: int, device: str = "cpu") -> None:
    """Refuse, before anything is allocated, a recipe whose predicted inference peak at
    ``batch_size`` does not fit ``device`` (``memory.check_fits``: one line with the estimate)."""
    from ..model import build_model
    from .memory import check_fits

    h, w = spec.img_hw
    memory, _ = predict_vit(build_model(spec, device="meta"), (batch_size, spec.in_chans, h, w))
    check_fits(memory["infer_peak_bytes"], f"{spec.name} at batch {batch_size}", device=device)


def combine_parts(model, dtype, embed, blocks, head, grad_checkpointing):
    """``memory.combine`` with the model's own parameter bytes (at ``dtype``) and trainable count."""
    tensors = list(model.parameters()) + list(model.buffers())
    params_bytes = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size()) for t in tensors)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return combine(params_bytes, trainable, dtype.itemsize, embed, blocks, head, grad_checkpointing)


def walk_count(model: nn.Module, images_shape: tuple[int, ...], dtype: torch.dtype | None = None,
               grad_checkpointing: bool = False, cache: PieceCache | None = None, second_opinion: bool = True,
               tokens: dict | None = None):
    """Counts, derivation note, memory and its breakdown of a meta ``VisionTransformer`` in one
    cached walk (what ``vitlab compare`` uses for its variants)."""
    dtype = dtype or torch.float32
    counts, note, (embed, blocks, head) = Walk(model, cache, dtype, want_counts=True,
                                               second_opinion=second_opinion).run(images_shape, tokens)
    memory, by_kind = combine_parts(model, dtype, embed, blocks, head, grad_checkpointing)
    return counts, note, memory, by_kind


def largest_batch(spec, budget: int, dtype: str = "fp32", grad_checkpointing: bool = False,
                  cache: PieceCache | None = None) -> int:
    """The largest training batch of ``spec`` whose predicted ``train_peak_bytes`` fits ``budget``."""
    from ..model import build_model
    from .memory import DTYPES, largest_fitting_batch

    model = build_model(spec, device="meta")
    H, W = spec.img_hw
    cache = cache if cache is not None else PieceCache()

    def peak(batch: int) -> int:
        memory, _ = predict_vit(model, (batch, spec.in_chans, H, W), DTYPES[dtype], grad_checkpointing, cache)
        return memory["train_peak_bytes"]

    return largest_fitting_batch(peak, budget)
