"""vitlab plugin: ``pos_embed: rope2d``, axial 2-D rotary position embedding.

RoPE-Axial of Heo et al. 2024 ("Rotary Position Embedding for Vision Transformer", RoPE-ViT):
queries and keys are rotated, pair by pair, by angles proportional to the token's patch position,
so that ``q_i · k_j`` depends on the *relative* offset of patches ``i`` and ``j``. Half of the
rotation pairs turn with the column index (x), the other half with the row index (y).

The encoding adds nothing to the tokens; it acts inside attention through
``PosEncoding.qk_transform(grid)``, a function the model puts in the forward state for the current
grid (recomputed when the grid changes) and every attention component applies to ``q`` and ``k`` (after its qk-norm, if any) without knowing what it is.
"""
from __future__ import annotations

import torch
from pydantic import Field

import vitlab
from vitlab.state import QKTransform

__version__ = "0.1.0"
vitlab_api = 2  # the vitlab plugin API this module is written for (docs/migration.md)


def axial_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """``theta ** (-4 t / head_dim)`` for ``t = 0 .. head_dim/4 - 1`` (RoPE-ViT's
    ``compute_axial_cis``): one frequency per rotation pair of each axis, float32 (head_dim/4,)."""
    quarter = head_dim // 4
    return theta ** (-torch.arange(quarter, dtype=torch.float32) * 4.0 / head_dim)


def rope_tables(
    grid: tuple[int, int], head_dim: int, theta: float, num_prefix: int = 0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each float32 (num_prefix + gh * gw, head_dim).

    Patch ``(r, c)`` (row-major, as the patch embedders flatten) gets angle ``c · f_t`` on pairs
    ``t < head_dim/4`` and ``r · f_t`` on the remaining pairs; both elements of a pair
    ``(2t, 2t + 1)`` share the angle. Prefix tokens (class, registers) get angle 0: cos 1, sin 0,
    the identity -- they carry no position.
    """
    gh, gw = grid
    freqs = axial_frequencies(head_dim, theta).to(device)
    rows = torch.arange(gh, dtype=torch.float32, device=device).repeat_interleave(gw)  # (N,)
    cols = torch.arange(gw, dtype=torch.float32, device=device).repeat(gh)  # (N,)
    angles = torch.cat([cols[:, None] * freqs, rows[:, None] * freqs], dim=-1)  # (N, head_dim/2)
    angles = angles.repeat_interleave(2, dim=-1)  # (N, head_dim): one angle per pair
    if num_prefix:
        angles = torch.cat([angles.new_zeros(num_prefix, head_dim), angles], dim=0)
    return angles.cos(), angles.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(a, b) -> (-b, a)`` on each interleaved pair of the last dimension."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair of ``x`` (..., N, head_dim) by its angle: the complex product
    ``(a + ib) · e^{iθ}`` of RoPE written in real arithmetic (compiles without complex dtypes)."""
    return x * cos + rotate_pairs(x) * sin


class Rope2d(vitlab.PosEncoding):
    """Axial 2-D rotary position embedding on queries and keys (RoPE-ViT), no additive table."""

    name = "rope2d"

    class Params(vitlab.PosEncoding.Params):
        theta: float = Field(
            100.0, gt=1.0,
            description="frequency base: pair t turns by theta^(-4t/head_dim) per patch step "
            "(RoPE-ViT uses 100 for its axial variant; language models use 10000)",
        )

    @classmethod
    def check(cls, ctx: vitlab.BuildContext, params: Params) -> None:
        if ctx.head_dim % 4:
            raise ValueError(
                f"needs head_dim (embed_dim / num_heads = {ctx.embed_dim} / {ctx.num_heads} = {ctx.head_dim}) "
                "divisible by 4: a quarter of the channels per (x, y) axis and pair element"
            )

    def __init__(self, ctx: vitlab.BuildContext, params: Params):
        super().__init__(ctx, params)
        self.theta = params.theta
        self.head_dim = ctx.head_dim
        self.num_prefix = ctx.num_prefix_tokens
        self.grid = tuple(ctx.grid_size)
        cos, sin = rope_tables(self.grid, self.head_dim, self.theta, self.num_prefix, device=ctx.device)
        # Not persistent: functions of the sizes, not weights. Kept float32 (angles need the precision).
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, state: vitlab.ForwardState) -> torch.Tensor:
        return x  # nothing is added to the tokens; see qk_transform

    def qk_transform(self, grid: tuple[int, int]) -> QKTransform:
        if tuple(grid) == self.grid:
            cos, sin = self.cos, self.sin
        else:  # another image size (dynamic_img_size): positions simply extend, as in RoPE-ViT
            cos, sin = rope_tables(tuple(grid), self.head_dim, self.theta, self.num_prefix, device=self.cos.device)

        def rotate(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            c, s = cos.to(q.dtype), sin.to(q.dtype)
            return apply_rope(q, c, s), apply_rope(k, c, s)

        return rotate

    def extra_repr(self) -> str:
        return f"theta={self.theta}, grid={self.grid}, head_dim={self.head_dim}, prefix={self.num_prefix}"


COMPONENTS = (Rope2d,)


@vitlab.hookimpl
def vitlab_register_components(register) -> None:
    for cls in COMPONENTS:
        register(cls)


__all__ = ["Rope2d", "apply_rope", "axial_frequencies", "rope_tables", "rotate_pairs", "vitlab_register_components"]
