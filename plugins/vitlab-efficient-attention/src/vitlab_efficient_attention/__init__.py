"""vitlab plugin: attention whose cost grows linearly with the number of tokens.

``attention: linear``
    Kernelised linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"), feature map
    ``phi(x) = elu(x) + 1``: ``out_i = phi(q_i)ᵀ (Σ_j phi(k_j) v_jᵀ) / phi(q_i)ᵀ Σ_j phi(k_j)``.
    Computed right to left, it costs O(N · head_dim²) per head instead of O(N² · head_dim) and never
    forms an attention matrix (``has_maps = False``).

``attention: window``
    Local attention inside non-overlapping ``window x window`` blocks of the patch grid (as in
    Swin, without the shift), on the fused kernel. Prefix tokens (class, registers) are global:
    each prefix query attends to every token, and every patch query attends to all prefix tokens
    plus the patches of its own window. Cost O(N · (P + window²) · head_dim) for N patches and P
    prefix tokens.

Both apply the model's ``qk_transform`` (e.g. ``rope2d``) without knowing what it is, and build
the recipe's norm on queries and keys when ``qk_norm`` is set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

import vitlab
from vitlab.component import QKTransform
from vitlab.components.attention import QKVAttention

__version__ = "0.1.0"


class _QKVAttention(QKVAttention):
    """vitlab's shared attention parts (qkv and output projections, qk-norm); subclasses write
    only how tokens are mixed."""


class LinearAttention(_QKVAttention):
    """Kernelised linear attention, phi = elu + 1 (Katharopoulos et al. 2020): cost linear in tokens, no maps."""

    name = "linear"
    has_maps = False  # there is no attention matrix to record

    class Params(_QKVAttention.Params):
        eps: float = Field(1e-6, gt=0.0, description="added to the normaliser phi(q)ᵀ Σ phi(k)")

    def __init__(self, ctx: vitlab.BuildContext, params: Params):
        super().__init__(ctx, params)
        self.eps = params.eps

    @staticmethod
    def feature_map(x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1.0

    def forward(self, x: torch.Tensor, qk_transform: QKTransform | None = None) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        fq, fk = self.feature_map(q), self.feature_map(k)  # (B, h, N, hd), positive
        # v with a column of ones: the same product then also yields the normaliser Σ_j phi(k_j).
        v1 = F.pad(v, (0, 1), value=1.0)  # (B, h, N, hd + 1)
        if qk_transform is None:
            out = fq @ (fk.transpose(-2, -1) @ v1)  # (B, h, N, hd + 1): O(N · hd²), never N x N
            num, den = out[..., :-1], out[..., -1:]
        else:
            # RoPE-style transforms rotate the features in the numerator only; the normaliser keeps
            # the unrotated (positive) features (RoFormer, Su et al. 2021, section 3.3).
            rq, rk = qk_transform(fq, fk)
            num = rq @ (rk.transpose(-2, -1) @ v)  # (B, h, N, hd)
            den = fq @ (fk.transpose(-2, -1) @ v1[..., -1:])  # (B, h, N, 1)
        return self.out(num / (den + self.eps))


class WindowAttention(_QKVAttention):
    """Local attention in non-overlapping windows of the patch grid; prefix tokens attend globally."""

    name = "window"

    class Params(_QKVAttention.Params):
        window: int = Field(7, gt=0, description="window side in patches; must divide both sides of the patch grid")
        attn_drop: float = Field(0.0, ge=0.0, lt=1.0)

    @classmethod
    def check(cls, ctx: vitlab.BuildContext, params: Params) -> None:
        gh, gw = ctx.grid_size
        w = params.window
        if gh % w or gw % w:
            divisors = sorted({d for d in range(1, min(gh, gw) + 1) if gh % d == 0 and gw % d == 0})
            raise ValueError(
                f"needs a window that divides the {gh}x{gw} patch grid, got window {w} (windows do not "
                f"pad); windows that fit: {', '.join(map(str, divisors))}"
            )
        if ctx.dynamic_img_size:
            raise ValueError(
                "does not support dynamic_img_size: true (attention sees tokens, not the grid, so its "
                "windows are laid out for the recipe's img_size)"
            )

    def __init__(self, ctx: vitlab.BuildContext, params: Params):
        super().__init__(ctx, params)
        self.window = params.window
        self.grid = tuple(ctx.grid_size)
        self.attn_drop = params.attn_drop

    def _windows(self, t: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, h, gh * gw, hd) -> (B, h, num_windows, window², hd)."""
        B, H, _, C = t.shape
        (gh, gw), w = self.grid, self.window
        t = t.reshape(B, H, gh // w, w, gw // w, w, C).permute(0, 1, 2, 4, 3, 5, 6)
        return t.reshape(B, H, (gh // w) * (gw // w), w * w, C)

    def _unwindow(self, t: torch.Tensor) -> torch.Tensor:
        """(B, h, num_windows, window², hd) -> (B, h, gh * gw, hd), row-major patches again."""
        B, H, _, _, C = t.shape
        (gh, gw), w = self.grid, self.window
        t = t.reshape(B, H, gh // w, gw // w, w, w, C).permute(0, 1, 2, 4, 3, 5, 6)
        return t.reshape(B, H, gh * gw, C)

    def allowed(self, device=None) -> torch.Tensor:
        """Which key each query may attend to, bool (P + N, P + N): prefix rows and prefix columns
        are all true; patch-to-patch entries only inside a window. The block-sparse pattern of the
        windowed computation, used by the explicit (recording) path."""
        (gh, gw), w, P = self.grid, self.window, self.num_prefix
        rows = torch.arange(gh, device=device).repeat_interleave(gw)
        cols = torch.arange(gw, device=device).repeat(gh)
        win = (rows // w) * (gw // w) + cols // w  # window id of each patch
        win = torch.cat([torch.full((P,), -1, device=device, dtype=win.dtype), win])
        prefix = win < 0
        return (win[:, None] == win[None, :]) | prefix[:, None] | prefix[None, :]

    def forward(self, x: torch.Tensor, qk_transform: QKTransform | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        P, (gh, gw) = self.num_prefix, self.grid
        if T != P + gh * gw:
            raise ValueError(f"window attention was built for {P} + {gh}x{gw} tokens, got {T}")
        q, k, v = self.qkv_heads(x)
        if qk_transform is not None:
            q, k = qk_transform(q, k)
        drop = self.attn_drop if self.training else 0.0
        if self.record_maps:
            # Explicit path: the full (B, h, T, T) probabilities, zero outside the allowed pattern;
            # equal to the windowed computation below.
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            attn = attn.masked_fill(~self.allowed(x.device), float("-inf")).softmax(dim=-1)
            self.attn_map = attn.detach()
            if drop:
                attn = F.dropout(attn, p=drop)
            return self.out(attn @ v)
        qw, kw, vw = (self._windows(t[:, :, P:]) for t in (q, k, v))  # (B, h, nW, w², hd)
        if P:
            nW = qw.shape[2]
            kw = torch.cat([k[:, :, None, :P].expand(-1, -1, nW, -1, -1), kw], dim=3)  # (B, h, nW, P + w², hd)
            vw = torch.cat([v[:, :, None, :P].expand(-1, -1, nW, -1, -1), vw], dim=3)
        patches = self._unwindow(self.attend(qw, kw, vw, dropout_p=drop))  # (B, h, N, hd)
        if P:
            prefix = self.attend(q[:, :, :P], k, v, dropout_p=drop)  # (B, h, P, hd): global
            patches = torch.cat([prefix, patches], dim=2)
        return self.out(patches)

    def extra_repr(self) -> str:
        return f"window={self.window}, grid={self.grid}, prefix={self.num_prefix}"


COMPONENTS = (LinearAttention, WindowAttention)


@vitlab.hookimpl
def vitlab_register_components(register) -> None:
    for cls in COMPONENTS:
        register(cls)


@vitlab.hookimpl
def vitlab_flop_handles(register) -> None:
    """``elu`` (linear attention's feature map) is elementwise: free, like every activation.
    Without this declaration FLOP reports would list it as unsupported."""
    register("aten::elu", free="activation (linear attention's elu + 1 feature map): elementwise")


__all__ = ["LinearAttention", "WindowAttention", "vitlab_register_components"]
