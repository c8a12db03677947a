"""timm's model API on vitlab's ``VisionTransformer``, with timm's semantics, so that timm's
``create_optimizer_v2`` (layer decay), ``resolve_data_config``, ``ModelEmaV3``, feature extraction
and training scripts treat a vitlab model as one of timm's.

``TimmModelAPI`` is a mixin: it reads the model's spec, registry, blocks and forward pieces
(``embed``, ``run_block``, ``norm``, ``pool``, ``head``) and never imports timm at module level.
For a staged model (``stages``) the features are per stage, as timm's PiT has them.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's ``global_pool`` names -> vitlab's pool components ('' keeps the tokens)
GLOBAL_POOLS = {"": "none", "token": "token", "avg": "avg", "map": "map"}


def feature_take_indices(num_features: int, indices: Optional[Union[int, list[int]]] = None) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: the last ``n`` features for an int (all for ``None``), the
    given ones for a sequence (negative from the end); with the largest index taken."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"indices: take the last 1..{num_features} features, not {indices}")
        take = [num_features - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            idx = num_features + i if i < 0 else i
            if not 0 <= idx < num_features:
                raise ValueError(f"indices: {i} is outside 0..{num_features - 1}")
            take.append(idx)
    return take, max(take)


def _timm_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained cfg of model ``name`` (mean, std, crop), or ``{}`` when timm does not know it."""
    try:
        import timm
    except ImportError:
        return {}
    if not timm.is_model(name):
        return {}
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def pretrained_cfg_of(spec) -> dict[str, Any]:
    """timm's pretrained cfg of a spec: input size and classes from the spec; mean, std, crop and
    interpolation from timm's cfg when the spec is a timm model's (its name), ImageNet's otherwise."""
    h, w = spec.img_hw
    cfg = dict(url="", num_classes=spec.num_classes, input_size=(spec.in_chans, h, w), pool_size=None,
               crop_pct=0.9, interpolation="bicubic", fixed_input_size=not spec.dynamic_img_size,
               mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="patch_embed.proj", classifier="head",
               architecture=spec.name)
    timm_cfg = _timm_cfg(spec.name)
    for key in ("mean", "std", "crop_pct", "crop_mode", "interpolation", "license"):
        if timm_cfg.get(key) is not None:
            cfg[key] = tuple(timm_cfg[key]) if isinstance(timm_cfg[key], list) else timm_cfg[key]
    if len(cfg["mean"]) != spec.in_chans:  # timm's convention for other channel counts: the first repeated
        cfg["mean"], cfg["std"] = (cfg["mean"][0],) * spec.in_chans, (cfg["std"][0],) * spec.in_chans
    return cfg


class TimmModelAPI:
    """timm's model API, mixed into ``VisionTransformer``."""

    # --- sizes and configuration -----------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def num_features(self) -> int:
        """Width of the final features (the last stage's)."""
        return self.spec.embed_dim

    @property
    def head_hidden_size(self) -> int:
        return self.num_features

    @property
    def global_pool(self) -> str:
        """The pool in timm's words where timm has one, else vitlab's pool name."""
        inverse = {v: k for k, v in GLOBAL_POOLS.items()}
        return inverse.get(self.spec.pool.name, self.spec.pool.name)

    def _stage_ends(self) -> list[int]:
        """The last block of each stage (every block without ``stages``)."""
        plans = self.spec.stage_plans()
        if self.spec.stages is None:
            return list(range(len(self.blocks)))
        return [p.start + p.depth - 1 for p in plans if p.start + p.depth - 1 < len(self.blocks)]

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's feature_info: per block (per stage when staged) its width, stride and module."""
        ph, pw = self.spec.patch_hw
        if self.spec.stages is None:
            return [dict(module=f"blocks.{i}", num_chs=self.spec.embed_dim, reduction=max(ph, pw))
                    for i in range(len(self.blocks))]
        out = []
        for plan, end, grid in zip(self.spec.stage_plans(), self._stage_ends(), self.stage_grids):
            out.append(dict(module=f"blocks.{end}", num_chs=plan.embed_dim,
                            reduction=self.spec.img_hw[0] // max(grid[0], 1)))
        return out

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's pretrained cfg (``pretrained_cfg_of``), with what was set over it; input size
        and classes always follow the spec (after ``set_input_size``, ``reset_classifier``)."""
        cfg = pretrained_cfg_of(self.spec)
        spec_owned = {k: cfg[k] for k in ("input_size", "num_classes", "fixed_input_size")}
        return {**cfg, **self.__dict__.get("_timm_pretrained_cfg", {}), **spec_owned}

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict[str, Any]) -> None:
        self.__dict__["_timm_pretrained_cfg"] = dict(cfg or {})

    default_cfg = pretrained_cfg

    # --- optimizer groups --------------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Parameters timm trains without weight decay: prefix tokens, every position encoding
        parameter, relative position tables."""
        out = {"cls_token", "reg_token"}
        for name, _ in self.named_parameters():
            if name.startswith("pos_embed.") or "relative_position_bias_table" in name:
                out.add(name)
        return out

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer groups (for layer-wise LR decay): the embedding, then one group per block
        (a transition joins the first block of its stage), the final norm with the last block;
        pool and head (unmatched) come last."""
        blocks: list[tuple[str, Any]] = [(r"^blocks\.(\d+)", None)]
        for plan in self.spec.stage_plans()[1:]:
            blocks.append((rf"^transitions\.{plan.index}\.", (plan.start,)))
        blocks.append((r"^norm", (99999,)))
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre", blocks=blocks)

    # --- classifier --------------------------------------------------------------------------------

    def get_classifier(self) -> nn.Module:
        return self.head

    def _make(self, kind: str, selection, ctx):
        """A component of the model's registry built outside ``__init__`` (a new pool)."""
        info = self.registry.get(kind, selection.name)
        return info.cls(ctx, info.cls.Params.model_validate(selection.params))

    def _respecced(self, **changes: Any):
        from .spec import ViTSpec

        return ViTSpec.validated({**self.spec.to_dict(), **changes}, self.registry)

    def _here(self) -> dict[str, Any]:
        p = next(iter(self.parameters()), None)
        return {"device": p.device, "dtype": p.dtype} if p is not None else {}

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head for ``num_classes`` (0: features), and a new pool when ``global_pool``
        (timm's ``''``, ``'token'``, ``'avg'``, ``'map'``, or a vitlab pool name) differs."""
        changes: dict[str, Any] = {"num_classes": num_classes}
        pool = None
        if global_pool is not None:
            pool = GLOBAL_POOLS.get(global_pool, global_pool)
            if pool != self.spec.pool.name:
                changes["pool"] = {"name": pool}
        spec = self._respecced(**changes)
        last = spec.stage_plans()[-1]  # the width the head sees (the last stage kept)
        ctx = self.head_ctx.replace(embed_dim=last.embed_dim, num_heads=last.num_heads, **self._here())
        if "pool" in changes:
            self.pool = self._make("pool", spec.pool, ctx)
            self.pool.train(self.training)
        self.spec = spec
        self.head = self.pool.make_head(ctx, num_classes)
        self.head.train(self.training)

    # --- input size ---------------------------------------------------------------------------------

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """Rebuild for another image (and patch) size, keeping every weight; learned position
        tables are resampled as timm resamples them."""
        changes = {k: list(v) if isinstance(v, tuple) else v
                   for k, v in (("img_size", img_size), ("patch_size", patch_size)) if v is not None}
        if not changes:
            return
        spec = self._respecced(**changes)
        new = type(self)(spec, registry=self.registry, **self._here())  # its own buffers at the new size
        state = self.state_dict()
        target = new.state_dict()
        for key, value in target.items():
            old = state.get(key)
            if old is not None and old.shape == value.shape:
                continue
            if key.startswith("pos_embed.") and hasattr(self.pos_embed, "table") and old is not None:
                state[key] = self.pos_embed.table(new.grid_size).detach()
            elif key.startswith("patch_embed.") and old is not None and old.ndim == 4:
                state[key] = torch.nn.functional.interpolate(  # (D, C, ph, pw) to the new patch
                    old.float(), size=value.shape[-2:], mode="bicubic", align_corners=False).to(old.dtype)
            else:
                raise ValueError(f"set_input_size: '{key}' changes shape {tuple(old.shape) if old is not None else None}"
                                 f" -> {tuple(value.shape)} and vitlab cannot resample it")
        new.load_state_dict(state)
        new.train(self.training)
        keep = {k: v for k, v in self.__dict__.items() if "hook" in k or k == "training"}
        self.__dict__.update({k: v for k, v in new.__dict__.items() if k not in keep})

    # --- intermediate features ----------------------------------------------------------------------

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, list[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              output_dict: bool = False):
        """timm's ``forward_intermediates``: the tokens after the chosen blocks (stages, when
        staged), without prefix tokens, as (B, D, gh, gw) for ``'NCHW'`` or (B, N, D) for
        ``'NLC'``; with ``norm`` through the final norm (a staged model's last stage only: the
        norm has its width). Returns ``(final tokens after the norm, intermediates)``, or the
        intermediates alone, or timm's dict with ``output_dict``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', not {output_fmt!r}")
        ends = self._stage_ends()
        take, max_index = feature_take_indices(len(ends), indices)
        last_block = ends[max_index] if stop_early else len(self.blocks) - 1
        wanted = {ends[i]: i for i in take}
        tokens, prefixes = [], []
        x, state = self.embed(x)
        for i in range(last_block + 1):
            x, state = self.run_block(i, x, state)
            if i in wanted:
                y = self.norm(x) if norm and (self.spec.stages is None or wanted[i] == len(ends) - 1) else x
                p = state.num_prefix
                prefixes.append(y[:, :p])
                y = y[:, p:]  # (B, N, D) patch tokens
                if output_fmt == "NCHW":
                    if state.grid is None:
                        raise ValueError(f"block {i} took the tokens off the patch grid: use output_fmt='NLC'")
                    B, _, D = y.shape
                    y = y.reshape(B, state.grid[0], state.grid[1], D).permute(0, 3, 1, 2).contiguous()  # (B, D, gh, gw)
                tokens.append(y)
        if output_dict:
            out: dict[str, Any] = {"image_intermediates": tokens}
            if return_prefix_tokens and self.num_prefix_tokens:
                out["image_intermediates_prefix"] = prefixes
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and self.num_prefix_tokens:
            tokens = list(zip(tokens, prefixes))
        if intermediates_only:
            return tokens
        return self.norm(x), tokens

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks (stages) after the last feature ``indices`` takes, and with
        ``prune_head`` the pool and head (timm's ``reset_classifier(0, '')``); returns the indices.
        The spec follows (its ``depth``), so counting the pruned model counts what runs."""
        ends = self._stage_ends()
        take, max_index = feature_take_indices(len(ends), indices)
        keep = ends[max_index] + 1
        if keep < len(self.blocks):
            if self.spec.stages is None:
                spec = self._respecced(depth=keep)
            else:
                stages = [dict(s) for s in self.spec.to_dict()["stages"][: max_index + 1]]
                spec = self._respecced(stages=stages, depth=keep, embed_dim=stages[-1]["embed_dim"],
                                       num_heads=stages[-1]["num_heads"])
            self.blocks = self.blocks[:keep]
            for key in [k for k in self.transitions if int(k) > max_index]:
                del self.transitions[key]
            self.spec = spec
        if prune_norm or (self.spec.stages is not None and keep < len(ends)):
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take
