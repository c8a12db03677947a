"""Base classes of the component kinds. A component names itself, declares its parameters as a
pydantic model that forbids unknown keys, and builds from a ``BuildContext`` plus those params.

Kinds, in the order a recipe lists them: ``patch_embed``, ``pos_embed``, ``attention``, ``mlp``,
``norm``, ``block``, ``pool``.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from .context import BuildContext

KINDS: tuple[str, ...] = ("patch_embed", "pos_embed", "attention", "mlp", "norm", "block", "pool")

# (q, k) -> (q, k), both (B, heads, N, head_dim): how a position encoding acts inside attention.
QKTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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
        """First line of the class docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

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
    """Adds position information. ``forward`` gets all tokens (B, P + N, D), prefix tokens first,
    and the patch grid; an encoding that acts inside attention returns a transform from
    ``qk_transform``."""

    kind = "pos_embed"

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return x

    def qk_transform(self, grid: tuple[int, int]) -> QKTransform | None:
        """A function applied to queries and keys (B, heads, N, head_dim) in every attention
        layer, or ``None``. Attention components apply it without knowing what it is (RoPE)."""
        return None


class Attention(Component):
    """Token mixing (B, N, D) -> (B, N, D).

    Attention that has a probability matrix computes it explicitly while ``record_maps`` is set
    and keeps it in ``attn_map`` (B, heads, N, N); otherwise it uses the fused kernel.
    """

    kind = "attention"
    has_maps: ClassVar[bool] = True

    def __init__(self, ctx: BuildContext, params: Any):
        super().__init__(ctx, params)
        self.record_maps = False
        self.attn_map: torch.Tensor | None = None

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
    ) -> torch.Tensor:
        """softmax(q kᵀ / sqrt(head_dim)) v for (B, heads, N, head_dim) inputs.

        The default path is the fused kernel; the explicit path runs only while recording and
        keeps the probabilities (the notebook's attention returned them).
        """
        if not self.record_maps:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, N, N)
        attn = attn.softmax(dim=-1)
        self.attn_map = attn.detach()
        if dropout_p:
            attn = F.dropout(attn, p=dropout_p)
        return attn @ v

    def forward(self, x: torch.Tensor, qk_transform: QKTransform | None = None) -> torch.Tensor:
        raise NotImplementedError


class Mlp(Component):
    """Channel mixing (B, N, D) -> (B, N, D)."""

    kind = "mlp"


class Norm(Component):
    """Normalisation over the last dimension; ``dim`` defaults to the embedding width."""

    kind = "norm"

    def __init__(self, ctx: BuildContext, params: Any, dim: int | None = None):
        super().__init__(ctx, params)


class Block(Component):
    """One transformer layer (B, N, D) -> (B, N, D): how attention, MLP, norms and residuals are
    ordered. Builds its parts with ``ctx.make("attention")`` etc."""

    kind = "block"

    def forward(self, x: torch.Tensor, qk_transform: QKTransform | None = None) -> torch.Tensor:
        raise NotImplementedError


class Pool(Component):
    """Tokens (B, N, D) -> pooled features (B, D), or tokens when ``keeps_tokens``."""

    kind = "pool"
    keeps_tokens: ClassVar[bool] = False


KIND_BASES: dict[str, type[Component]] = {
    b.kind: b for b in (PatchEmbed, PosEncoding, Attention, Mlp, Norm, Block, Pool)
}
