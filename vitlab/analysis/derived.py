"""Derived counts: the embedding traced once, each distinct (block, input shape) traced once, the
head traced once, the totals summed as ``embedding + sum(blocks) + head``.

The input of every block is followed through the model (token merging and stage transitions
change it), so blocks alike in structure but fed different shapes are counted apart. Exact when
blocks of equal structure on equal inputs cost the same, which holds for every built-in (blocks
differ only in their index and stochastic-depth rate, both inert in inference);
``tests/test_flops.py`` and ``tests/test_layout.py`` prove derived == full on several variants.
It needs real weights for one block at a time only, so a 22 B-parameter model is counted in the
memory of one block when meta tensors cannot be used.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch import nn

from ..state import ForwardState
from .count import Counts, count, materialize

_INERT = (nn.Dropout, nn.Identity)


_SIMPLE = (int, float, bool, str, tuple, type(None))


def _settings(module: nn.Module, training: bool) -> tuple:
    """Plain attributes of every submodule (``num_heads``, ``head_dim``, ``eps`` ...): heads 3 and
    6 have the same weight shapes, so shapes alone do not tell them apart. Dropout-like modules
    count only in ``training`` (whether a mask is saved for backward), and then only as a rate of
    zero or not; they never cost a FLOP."""
    parts = []
    for name, m in module.named_modules():
        inert = isinstance(m, _INERT) or type(m).__name__ == "DropPath"
        if inert and not training:
            continue
        attrs = tuple(sorted((k, bool(v) if inert and isinstance(v, float) else v) for k, v in vars(m).items()
                             if not k.startswith("_") and k != "training" and isinstance(v, _SIMPLE)))
        parts.append((name, attrs))
    return tuple(parts)


def block_signature(block: nn.Module, training: bool = False) -> tuple:
    """What makes two blocks cost the same: module types and settings (``extra_repr`` and plain
    attributes), parameter and buffer shapes. Dropout / stochastic-depth rates are left out (inert
    in inference) unless ``training`` (memory: whether masks are saved)."""
    parts = []
    for name, m in block.named_modules():
        if isinstance(m, _INERT) or type(m).__name__ == "DropPath":
            parts.append((name, "inert", ""))  # identity in eval: DropPath(0.1) ~ Identity ~ Dropout
        else:
            parts.append((name, type(m).__qualname__, m.extra_repr()))
    for name, t in list(block.named_parameters()) + list(block.named_buffers()):
        parts.append((name, tuple(t.shape), str(t.dtype)))
    return (type(block).__qualname__, repr(getattr(block, "params", None)), tuple(parts), _settings(block, training))


def distinct_blocks(blocks: nn.ModuleList) -> list[list[int]]:
    """Indices of the blocks grouped by signature, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, block in enumerate(blocks):
        groups.setdefault(block_signature(block), []).append(i)
    return list(groups.values())


class _Call(nn.Module):
    """One piece of the model's forward as a module to trace: the model is the child ``model``,
    so its modules trace as ``model.*`` and rename to the model's own names."""

    def __init__(self, model: nn.Module, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(*inputs)


def traced(result: tuple[torch.Tensor, ForwardState]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """What a traced piece must return: the tokens and the tensors its new state carries. A shared
    attention bias computed in the embedding (or recomputed by a transition) feeds later blocks,
    not these tokens, and a trace would drop it as dead code; the full trace counts it."""
    x, state = result
    extra = tuple(t for t in (state.attn_bias, state.token_weights, *_closed_over(state.qk_transform))
                  if isinstance(t, torch.Tensor))
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


def _renamer(renames: dict[str, str]) -> Callable[[str], str]:
    """Traced names (``model.blocks.3.attn``) -> the model's (``blocks.3.attn``), with whole-name
    prefixes swapped by ``renames`` (a counted block standing for another: ``blocks.3`` -> ``blocks.7``)."""
    def rename(name: str) -> str | None:
        if name == "model":  # fvcore counts ancestors inclusively: the root "" already holds it
            return None
        name = name.removeprefix("model.")
        for old, new in renames.items():
            if name == old or name.startswith(old + "."):
                return new + name[len(old):]
        return name

    return rename


def _add(total: Counts, part: Counts, rename: Callable[[str], str]) -> None:
    for name, c in part.by_module_op.items():
        name = rename(name)
        if name is not None:
            total.by_module_op.setdefault(name, Counter()).update(c)
    total.unsupported.update(part.unsupported)
    if total.flop_counter is not None and part.flop_counter is not None:
        total.flop_counter += part.flop_counter
    elif part.flop_counter is None:
        total.flop_counter = None


def _state_key(state: ForwardState) -> tuple:
    """What of a forward state can change a block's cost: token layout and position tensors' shapes."""
    shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
    return (state.grid, state.num_prefix, state.num_tokens, state.qk_transform is not None,
            shape(state.attn_bias), shape(state.token_weights))


def derived_count(model: nn.Module, images: torch.Tensor, materialize_blocks: bool = False,
                  second_opinion: bool = True, tokens: dict | None = None) -> tuple[Counts, str]:
    """Count a ``VisionTransformer`` piece by piece: the embedding once, each distinct
    (block, input shape, state) once -- a block with the transition into its stage, if any --
    and the head once, following the real shapes from block to block (token merging, stages).

    ``materialize_blocks``: the model is on meta but must run on real weights: the shell and each
    counted block get zero-filled CPU storage (one block at a time in memory).
    Returns the counts (shaped like a full trace's, per-block entries included) and a sentence
    saying how they were derived. ``tokens`` (``analysis.token_trace``'s record) is filled by its
    hooks as the blocks run; a stage whose first block repeats an earlier one takes that one's count.
    """
    pieces = [m for name, m in model.named_children() if name not in ("blocks", "transitions")]
    if materialize_blocks:
        for m in pieces:
            materialize(m)
        _materialize_tokens(model)
    make = torch.empty if images.device.type == "meta" else torch.zeros

    embed = _Call(model, lambda im: traced(model.embed(im)))
    total = count(embed, (images,), second_opinion, registry=model.registry)
    total, embedded = Counts({}, Counter(), 0 if second_opinion else None), total
    _add(total, embedded, _renamer({}))
    with torch.no_grad():
        x, state = model.embed(images)

    counted: dict[tuple, tuple[int, Counts, tuple, ForwardState]] = {}
    groups: dict[tuple, list[int]] = {}
    for i in range(len(model.blocks)):
        stage = model._transition_at.get(i)
        acts_after = model.pos_embed.acts_after(i)
        key = (block_signature(model.blocks[i]), tuple(x.shape), _state_key(state), acts_after,
               None if stage is None else block_signature(model.transitions[stage]))
        if key not in counted:
            parts = [model.blocks[i]] + ([model.transitions[stage]] if stage is not None else [])
            if materialize_blocks:
                for m in parts:
                    materialize(m)
            xb = make(x.shape, dtype=x.dtype, device=x.device)
            one = count(_Call(model, lambda t, i=i, st=state: traced(model.run_block(i, t, st))), (xb,), second_opinion,
                        registry=model.registry)
            with torch.no_grad():
                out, new_state = model.run_block(i, xb, state)
            if materialize_blocks:
                for m in parts:
                    m.to("meta")  # release the block's memory before the next one
            counted[key] = (i, one, tuple(out.shape), new_state)
        first, one, out_shape, new_state = counted[key]
        first_stage = model._transition_at.get(first)
        if tokens is not None and stage is not None and first != i and ("stage", int(first_stage)) in tokens:
            tokens.setdefault(("stage", int(stage)), tokens[("stage", int(first_stage))])
        renames = {f"blocks.{first}": f"blocks.{i}"}
        if stage is not None:
            renames[f"transitions.{model._transition_at[first]}"] = f"transitions.{stage}"
        _add(total, one, _renamer(renames))
        groups.setdefault(key, []).append(i)
        x = make(out_shape, dtype=x.dtype, device=x.device)
        state = new_state

    head = _Call(model, lambda t: model.forward_head(model.norm(t)))
    _add(total, count(head, (x,), second_opinion, registry=model.registry), _renamer({}))
    spans = ", ".join(_span(g) for g in groups.values())
    note = (f"derived: {len(model.blocks)} blocks in {len(groups)} distinct (block, input shape) "
            f"configuration(s) ({spans}); one block of each traced on its own input and multiplied, the "
            "embedding and the head traced once; assumes blocks of equal structure (module types, settings, "
            "parameter shapes) on inputs of equal shape cost the same")
    return total, note


def _materialize_tokens(model: nn.Module) -> None:
    """Class and register tokens are the model's own parameters (not in a child module)."""
    for name in ("cls_token", "reg_token"):
        p = getattr(model, name, None)
        if p is not None and p.is_meta:
            setattr(model, name, nn.Parameter(torch.zeros(p.shape, dtype=p.dtype)))
def _span(group: list[int]) -> str:
    if len(group) == 1:
        return f"block {group[0]}"
    if group == list(range(group[0], group[-1] + 1)):
        return f"blocks {group[0]}-{group[-1]}"
    return f"{len(group)} blocks from {group[0]}"
