"""vitlab plugin: attention whose cost grows linearly with the number of tokens.

``attention: linear``
    Kernelised linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"), feature map
    ``phi(x) = elu(x) + 1``: ``out_i = phi(q_i)ᵀ (Σ_j phi(k_j) v_jᵀ) / phi(q_i)ᵀ Σ_j phi(k_j)``.
    Computed right to left, it costs O(N · head_dim²) per head instead of O(N² · head_dim) and never
    forms an attention matrix (``has_maps = False``).

timm interop: ``TimmLinearAttention`` is the same attention as a timm-compatible module (the
constructor timm's ``Block`` calls), declared through ``vitlab_timm_equivalents``; so
``timm_kwargs`` gives ``VisionTransformer(attn_layer=TimmLinearAttention)``, ``to_timm_state_dict``
its weights, and ``spec_from_timm`` reads such a timm model back to ``attention: linear``.

It applies the forward state's q/k transform (e.g. ``rope2d``) without knowing what it is, and
builds the recipe's norm on queries and keys when ``qk_norm`` is set. (Window attention, once part
of this plugin, is a vitlab built-in since 0.2: ``attention: {name: window, params: {window_size: 7}}``.)
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

import vitlab
from vitlab.components.attention import QKVAttention

__version__ = "0.1.0"
vitlab_api = 2  # the vitlab plugin API this module is written for (docs/migration.md)


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

    def forward(self, x: torch.Tensor, state: vitlab.ForwardState) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        if k.shape[1] != q.shape[1]:  # grouped kv heads: each query head reads its group's
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        fq, fk = self.feature_map(q), self.feature_map(k)  # (B, h, N, hd), positive
        # v with a column of ones: the same product then also yields the normaliser Σ_j phi(k_j).
        v1 = F.pad(v, (0, 1), value=1.0)  # (B, h, N, hd + 1)
        if state.qk_transform is None:
            out = fq @ (fk.transpose(-2, -1) @ v1)  # (B, h, N, hd + 1): O(N · hd²), never N x N
            num, den = out[..., :-1], out[..., -1:]
        else:
            # RoPE-style transforms rotate the features in the numerator only; the normaliser keeps
            # the unrotated (positive) features (RoFormer, Su et al. 2021, section 3.3).
            rq, rk = state.transform_qk(fq, fk)
            num = rq @ (rk.transpose(-2, -1) @ v)  # (B, h, N, hd)
            den = fq @ (fk.transpose(-2, -1) @ v1[..., -1:])  # (B, h, N, 1)
        return self.out(num / (den + self.eps))


class TimmLinearAttention(nn.Module):
    """``linear`` as a module timm's ``VisionTransformer`` builds (``attn_layer=``): timm's
    attention constructor and parameter names (``qkv``, ``q_norm``, ``k_norm``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer=None, eps: float = 1e-6, device=None, dtype=None, **_):
        super().__init__()
        if scale_norm:
            raise ValueError("TimmLinearAttention has no sub-LN (scale_norm)")
        dd = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim, self.eps = num_heads, dim // num_heads, eps
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("TimmLinearAttention takes no attention mask")
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        fq, fk = LinearAttention.feature_map(self.q_norm(q)), LinearAttention.feature_map(self.k_norm(k))
        out = fq @ (fk.transpose(-2, -1) @ F.pad(v, (0, 1), value=1.0))  # (B, h, N, hd + 1)
        out = out[..., :-1] / (out[..., -1:] + self.eps)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


def _read_timm(m: TimmLinearAttention) -> dict:
    return {"qkv_bias": m.qkv.bias is not None, "proj_bias": m.proj.bias is not None,
            "qk_norm": not isinstance(m.q_norm, nn.Identity), "eps": m.eps}


COMPONENTS = (LinearAttention,)


@vitlab.hookimpl
def vitlab_register_components(register) -> None:
    for cls in COMPONENTS:
        register(cls)


@vitlab.hookimpl
def vitlab_flop_handles(register) -> None:
    """``elu`` (linear attention's feature map) is elementwise: free, like every activation.
    Without this declaration FLOP reports would list it as unsupported."""
    register("aten::elu", free="activation (linear attention's elu + 1 feature map): elementwise")


@vitlab.hookimpl
def vitlab_timm_equivalents(register) -> None:
    """``linear`` <-> ``TimmLinearAttention`` inside timm's VisionTransformer; same parameter names."""
    register(vitlab.TimmEquivalent(kind="attention", name="linear", timm_type=TimmLinearAttention, read=_read_timm,
                                   layer=lambda params: functools.partial(TimmLinearAttention, eps=params["eps"])))


__all__ = ["LinearAttention", "TimmLinearAttention", "vitlab_register_components", "vitlab_timm_equivalents"]
