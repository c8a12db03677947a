"""Base classes of the component kinds. A component names itself, declares its parameters as a
pydantic model that forbids unknown keys, and builds from a ``BuildContext`` plus those params.

Kinds, in the order a recipe lists them: ``patch_embed``, ``pos_embed``, ``attention``, ``mlp``,
``norm``, ``block``, ``pool``, and ``transition`` (between the ``stages`` of a staged model).

At forward time blocks, attention, position encodings and transitions receive a
:class:`~vitlab.state.ForwardState` (grid, prefix tokens, block index, position transform and bias).
"""
from __future__ import annotations

import inspect
import re
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from .context import BuildContext
from .kinds import BLOCK_KINDS, KINDS  # noqa: F401  (re-exported: the kinds with their bases)
from .layers import Linear
from .state import ForwardState, QKTransform

# A sentence ends at ". " followed by something that starts a sentence; "e.g.", "i.e.", "et al."
# and "vs." do not end one.
_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bet al)(?<!\bvs)[.!?](?=\s+[A-Z`(\"']|$)")



class Component(nn.Module):
    """A named, self-describing building block. Subclass one of the kind bases below."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""

    class Params(BaseModel):
        """The component's own settings; unknown keys are refused."""

        # unknown keys fail; inf/nan are never sensible sizes or rates; bools must be bools
        model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @classmethod
    def check(cls, ctx: BuildContext, params: Any) -> None:
        """Raise ``ValueError`` when ``params`` do not fit the shared sizes in ``ctx``.

        Called at validation time (with a context on the meta device), so a recipe that cannot be
        built fails before anything is allocated.
        """

    @classmethod
    def describe(cls) -> str:
        """The first sentence of the class docstring's first paragraph, on one line (never cut
        mid-sentence, as the docstring's first line may be)."""
        paragraph = " ".join(inspect.cleandoc(cls.__doc__ or "").split("\n\n", 1)[0].split())
        m = _SENTENCE_END.search(paragraph)
        return paragraph[: m.end()] if m else paragraph

    def __init__(self, ctx: BuildContext, params: Any):
        super().__init__()
        self.params = params


class PatchEmbed(Component):
    """Images (B, C, H, W) -> patch tokens (B, gh * gw, D)."""

    kind = "patch_embed"

    @classmethod
    def grid_size(cls, img_size: tuple[int, int], patch_size: tuple[int, int], params: Any) -> tuple[int, int]:
        """Patch grid produced at ``img_size``. Override for embedders that pad or downsample
        differently; the default needs the image to divide evenly into patches."""
        (h, w), (ph, pw) = img_size, patch_size
        if h % ph or w % pw:
            raise ValueError(
                f"image size {h}x{w} is not divisible by patch size {ph}x{pw} "
                f"(patch embedder '{cls.name}' does not pad)"
            )
        return h // ph, w // pw


class PosEncoding(Component):
    """Adds position information, in up to four places:

    * ``forward(x, state)``: to all tokens (B, P + N, D), prefix first, right after the embedding;
    * ``qk_transform(grid)``: a transform of queries and keys inside every attention (RoPE);
    * ``attn_bias(grid, num_prefix)``: an additive attention bias shared by every attention;
    * ``after_block(x, state)``: to the tokens after a block (CPVT's position generator).

    The model recomputes the transform and bias whenever the grid changes (another image size,
    a stage transition); when a block merges tokens off the grid they are lost, and the next block
    refuses to run without them (``ForwardState.regrid``).
    """

    kind = "pos_embed"

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        return x

    def qk_transform(self, grid: tuple[int, int]) -> QKTransform | None:
        """A function applied to queries and keys (B, heads, N, head_dim) in every attention
        layer, or ``None``. Attention components apply it without knowing what it is (RoPE)."""
        return None

    def attn_bias(self, grid: tuple[int, int], num_prefix: int) -> torch.Tensor | None:
        """An additive bias broadcastable to (B, heads, P + N, P + N) for every attention, or ``None``."""
        return None

    @classmethod
    def gives_qk_transform(cls) -> bool:
        """Whether this encoding has a ``qk_transform`` of its own (checked against attention that
        takes none, ``Attention.takes_qk_transform``, when a recipe validates)."""
        return cls.qk_transform is not PosEncoding.qk_transform

    @classmethod
    def gives_attn_bias(cls) -> bool:
        """Whether this encoding has an ``attn_bias`` of its own (checked against attention that
        takes none, ``Attention.takes_attn_bias``, when a recipe validates)."""
        return cls.attn_bias is not PosEncoding.attn_bias

    def after_block(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """Tokens after block ``state.block_index``; the default adds nothing."""
        return x

    def acts_after(self, block_index: int) -> Any:
        """Whether ``after_block`` does anything after that block: derived counts tell blocks apart
        by it. An encoding may say so (CPVT's ``peg`` acts after one block only: ``True`` there,
        ``False`` elsewhere); the default never undercounts: ``False`` when ``after_block`` is not
        overridden, else the block index itself, so each block is traced with the encoding on its
        own (derived costs as much as full, and stays equal to it)."""
        return False if type(self).after_block is PosEncoding.after_block else ("block", block_index)


class Attention(Component):
    """Token mixing (B, N, D) -> (B, N, D).

    Attention that has a probability matrix computes it explicitly while ``record_maps`` is set
    and keeps it in ``attn_map`` (B, heads, N, N); otherwise it uses the fused kernel.
    """

    kind = "attention"
    has_maps: ClassVar[bool] = True
    # False: no place for an additive bias over token pairs (XCiT's channel attention); a recipe
    # whose position encoding gives one is refused when it validates
    takes_attn_bias: ClassVar[bool] = True
    # False: no place for a transform of queries and keys (RoPE): keys pooled or queries not tokens
    takes_qk_transform: ClassVar[bool] = True
    # True: heads split the width (head_dim = embed_dim / num_heads), so the spec refuses a width
    # its heads do not divide; False: each head has a width of its own (LeViT's key_dim)
    splits_width: ClassVar[bool] = True

    def __init__(self, ctx: BuildContext, params: Any):
        super().__init__(ctx, params)
        self.record_maps = False
        self.attn_map: torch.Tensor | None = None

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """softmax(q kᵀ / sqrt(head_dim) + bias) v.

        Args:
            q: (B, heads, Nq, head_dim).
            k, v: (B, kv_heads, Nk, head_dim) with ``heads`` a multiple of ``kv_heads``
                (grouped-query / multi-query attention: each group of query heads shares one).
            bias: additive, broadcastable to (B, heads, Nq, Nk) (relative position bias, masks).

        The default path is the fused kernel; the explicit path runs only while recording and
        keeps the probabilities (the notebook's attention returned them). Both count the same FLOPs.
        """
        groups = q.shape[1] // k.shape[1]
        if not self.record_maps:
            if groups > 1:  # the fused kernel shares kv heads itself: no copies of k and v
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        if groups > 1:  # (B, kv_heads, N, hd) -> (B, heads, N, hd), head h reads kv head h // groups
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, Nq, Nk)
        if bias is not None:
            attn = attn + bias
        attn = attn.softmax(dim=-1)
        self.attn_map = attn.detach()
        if dropout_p:
            attn = F.dropout(attn, p=dropout_p)
        return attn @ v

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        raise NotImplementedError


class Mlp(Component):
    """Channel mixing (B, N, D) -> (B, N, D)."""

    kind = "mlp"
    # True: forward(x, state), for an MLP that needs the grid (PVTv2's depthwise conv); only blocks
    # that hand their MLP the state (``Block.gives_mlp_state``) can hold it, checked at validation
    takes_state: ClassVar[bool] = False


class Norm(Component):
    """Normalisation over the last dimension; ``dim`` defaults to the embedding width."""

    kind = "norm"

    def __init__(self, ctx: BuildContext, params: Any, dim: int | None = None):
        super().__init__(ctx, params)


class Block(Component):
    """One transformer layer (B, N, D) -> (B, N, D): how attention, MLP, norms and residuals are
    ordered. Builds its parts with ``ctx.make("attention")`` etc. (this block's selections, which
    the recipe's ``layers`` may override).

    ``forward(x, state)`` returns the tokens, or ``(tokens, new_state)`` when the block changed
    their number or grid (token merging); see ``ForwardState.regrid``. The model checks that the
    tokens returned match the state returned, and refuses naming the block.
    """

    kind = "block"
    # True: calls its MLP as mlp(x, state) when the MLP ``takes_state``
    gives_mlp_state: ClassVar[bool] = False

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor | tuple[torch.Tensor, ForwardState]:
        raise NotImplementedError


class Pool(Component):
    """Tokens (B, N, D) -> pooled features (B, D), or tokens when ``keeps_tokens``; ``make_head``
    builds the classifier that follows."""

    kind = "pool"
    keeps_tokens: ClassVar[bool] = False

    def make_head(self, ctx: BuildContext, num_classes: int) -> nn.Module:
        """The classifier after this pool: its features -> logits (B, num_classes), or with
        ``num_classes == 0`` -> the model's output. One Linear (none for 0) unless a pool whose
        features feed several classifiers (a distillation token's) builds its own."""
        return Linear(ctx.embed_dim, num_classes, **ctx.factory_kwargs) if num_classes else nn.Identity()


class Transition(Component):
    """Between two ``stages``: maps the tokens of one stage to the next, (B, P + N, D_in) ->
    (B, P + N', D_out), and may change the patch grid, the width and the number of tokens.

    Built with the context of the stage it leads into (``embed_dim``, ``num_heads``) plus
    ``ctx.in_dim`` (the previous stage's width), ``ctx.grid_size`` (the grid it receives) and the
    prefix tokens it receives (``ctx.class_token``, ``ctx.reg_tokens``).
    ``forward(x, state)`` returns ``(tokens, state.regrid(new_grid))``.
    """

    kind = "transition"

    @classmethod
    def out_grid(cls, grid: tuple[int, int], params: Any) -> tuple[int, int]:
        """The grid this transition produces from ``grid`` (checked at validation time)."""
        return tuple(grid)

    @classmethod
    def out_prefix(cls, class_token: bool, reg_tokens: int, params: Any) -> tuple[bool, int]:
        """The prefix tokens ``(class token, register tokens)`` leading what this transition
        produces from those it receives (CaiT's ``class_token`` adds one); the default keeps them."""
        return class_token, reg_tokens

    def forward(self, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        raise NotImplementedError


KIND_BASES: dict[str, type[Component]] = {
    b.kind: b for b in (PatchEmbed, PosEncoding, Attention, Mlp, Norm, Block, Pool, Transition)
}
