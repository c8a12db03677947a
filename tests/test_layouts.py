"""Checkpoints in the original layouts timm converts (issue 12, "Weights in, whatever layout"):
OpenAI CLIP, DINOv2 with registers, big_vision ``.npz``, and FlexiViT's patch-kernel resampling.

Each original checkpoint is written by the test itself from a timm model, with the original
project's names spelled out here (not produced by vitlab or by timm's converters), so the
reference is timm's model: vitlab must load the original file and give timm's outputs.
"""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from vitlab import build_model  # noqa: E402
from vitlab.errors import WeightsError  # noqa: E402
from vitlab.timm_interop import load_timm_weights, spec_from_timm  # noqa: E402
from vitlab.timm_interop.layouts import layout_of  # noqa: E402
from timm_reference import assert_close, assert_outputs_match_timm, randomize  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")

SMALL = dict(depth=2, embed_dim=64, num_heads=2, img_size=64)


def _check(tm, ckpt, *, note: str):
    _, report = assert_outputs_match_timm(tm, weights=ckpt)
    assert any(note in n for n in report.notes), report.notes
    return report


def _openai_clip(tm) -> dict[str, torch.Tensor]:
    """OpenAI CLIP's own names (``clip/model.py``: VisionTransformer under ``visual.``), plus a text
    tower key the conversion must drop."""
    sd = {k: v.detach().clone() for k, v in tm.state_dict().items()}
    out = {
        "visual.class_embedding": sd["cls_token"][0, 0],
        "visual.positional_embedding": sd["pos_embed"][0],
        "visual.conv1.weight": sd["patch_embed.proj.weight"],
        "visual.ln_pre.weight": sd["norm_pre.weight"], "visual.ln_pre.bias": sd["norm_pre.bias"],
        "visual.ln_post.weight": sd["norm.weight"], "visual.ln_post.bias": sd["norm.bias"],
        "visual.proj": sd["head.weight"].T.contiguous(),
        "logit_scale": torch.tensor(4.6),
        "transformer.resblocks.0.ln_1.weight": torch.ones(8),  # the text tower's
    }
    names = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "attn.in_proj_weight",
             "attn.qkv.bias": "attn.in_proj_bias", "attn.proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj"}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            for timm_name, clip_name in names.items():
                if rest.startswith(timm_name):
                    rest = clip_name + rest[len(timm_name):]
                    break
            out[f"visual.transformer.resblocks.{i}.{rest}"] = v
    return out


def test_openai_clip_layout(tmp_path):
    from safetensors.torch import save_file

    tm = randomize(timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, **SMALL,
                                     num_classes=32)).eval()
    with torch.no_grad():
        tm.head.bias.zero_()  # CLIP's projection has no bias
    path = tmp_path / "clip.safetensors"
    save_file(_openai_clip(tm), str(path))
    assert layout_of(_openai_clip(tm)) == "OpenAI CLIP"
    _check(tm, path, note="OpenAI CLIP layout, converted by timm's timm.models.vision_transformer")


def test_dinov2_original_layout_with_registers():
    """DINOv2's own checkpoints keep a class-token position row, ``register_tokens`` and a
    ``mask_token``; timm folds the row into the class token."""
    tm = randomize(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, depth=2,
                                     img_size=56)).eval()
    sd = {k: v.detach().clone() for k, v in tm.state_dict().items()}
    row = torch.randn(1, 1, sd["cls_token"].shape[-1], generator=torch.Generator().manual_seed(3))
    sd["cls_token"] = sd["cls_token"] - row
    sd["pos_embed"] = torch.cat([row, sd.pop("pos_embed")], dim=1)
    sd["register_tokens"] = sd.pop("reg_token")
    sd["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    _check(tm, sd, note="DINOv2 layout")


def _big_vision(tm) -> dict[str, np.ndarray]:
    """big_vision's ``vit.py`` parameter tree, flattened with ``/`` (Flax kernels are (in, out),
    convolutions (h, w, in, out), attention (D, heads, head_dim))."""
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    D, H = tm.embed_dim, tm.blocks[0].attn.num_heads
    out = {
        "params/embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "params/embedding/bias": sd["patch_embed.proj.bias"],
        "params/cls": sd["cls_token"],
        "params/pos_embedding": sd["pos_embed"],
        "params/Transformer/encoder_norm/scale": sd["norm.weight"],
        "params/Transformer/encoder_norm/bias": sd["norm.bias"],
        "params/head/kernel": sd["head.weight"].T,
        "params/head/bias": sd["head.bias"],
    }
    for i in range(len(tm.blocks)):
        b, p = f"blocks.{i}.", f"params/Transformer/encoderblock_{i}/"
        for ln, name in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
            out[f"{p}{ln}/scale"], out[f"{p}{ln}/bias"] = sd[b + name + ".weight"], sd[b + name + ".bias"]
        qkv_w, qkv_b = np.split(sd[b + "attn.qkv.weight"], 3), np.split(sd[b + "attn.qkv.bias"], 3)
        for n, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
            out[f"{p}MultiHeadDotProductAttention_0/{n}/kernel"] = w.T.reshape(D, H, D // H)
            out[f"{p}MultiHeadDotProductAttention_0/{n}/bias"] = bias.reshape(H, D // H)
        out[f"{p}MultiHeadDotProductAttention_0/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(H, D // H, D)
        out[f"{p}MultiHeadDotProductAttention_0/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            out[f"{p}MlpBlock_0/Dense_{r}/kernel"] = sd[f"{b}mlp.fc{r + 1}.weight"].T
            out[f"{p}MlpBlock_0/Dense_{r}/bias"] = sd[f"{b}mlp.fc{r + 1}.bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def test_big_vision_npz(tmp_path):
    tm = randomize(timm.create_model("vit_base_patch16_224", pretrained=False, **SMALL, num_classes=10)).eval()
    path = tmp_path / "bv.npz"
    np.savez(path, **_big_vision(tm))
    _check(tm, path, note="big_vision .npz, read by timm's timm.models.vision_transformer.VisionTransformer")


def test_npz_claiming_more_than_the_model_can_hold_is_refused_unread(tmp_path):
    """A header's shape is a claim: refused from the headers, before numpy allocates it."""
    tm = timm.create_model("vit_base_patch16_224", pretrained=False, **SMALL)
    path = tmp_path / "huge.npz"
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("params/embedding/kernel.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(b"\0" * 64)
    with pytest.raises(WeightsError, match="claim .* refused before reading"):
        load_timm_weights(build_model(spec_from_timm(tm)), path)


def test_npz_with_objects_is_refused(tmp_path):
    tm = timm.create_model("vit_base_patch16_224", pretrained=False, **SMALL)
    path = tmp_path / "obj.npz"
    np.savez(path, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(WeightsError, match="holds Python objects"):
        load_timm_weights(build_model(spec_from_timm(tm)), path)


def test_original_layout_needs_a_timm_equivalent():
    """A CLIP checkpoint for a spec timm cannot build is refused by name, not guessed at."""
    import vitlab

    tm = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, **SMALL)
    data = spec_from_timm(tm).to_dict()
    data["layers"] = [{"at": 1, "attention": {"params": {"kv_heads": 1}}}]
    model = build_model(vitlab.load_spec(data))
    with pytest.raises(WeightsError, match="OpenAI CLIP layout needs timm's equivalent"):
        load_timm_weights(model, _openai_clip(tm))


def test_flexivit_patch_kernel_resampling():
    """An 8 px kernel loaded into a 16 px model is resampled with FlexiViT's pseudo-inverse: for any
    patch x, <x, w> equals <resize(x), w'> (Beyer et al. 2023, eq. 3; exact when upsampling), with
    resize the bicubic, antialiased interpolation the resampling assumes."""
    small = {**SMALL, "img_size": 32}
    tm = randomize(timm.create_model("vit_base_patch16_224", pretrained=False, **small, patch_size=8)).eval()
    big = timm.create_model("vit_base_patch16_224", pretrained=False, **SMALL, patch_size=16)
    model = build_model(spec_from_timm(big))  # the same 4 x 4 grid, in 16 px patches
    report = load_timm_weights(model, tm)
    assert report.ok and "patch_embed.proj.weight" in report.resampled
    assert any("FlexiViT" in n and "8x8 resampled to 16x16" in n for n in report.notes), report.notes
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    up = F.interpolate(x, size=(16, 16), mode="bicubic", antialias=True)
    with torch.no_grad():
        theirs = F.conv2d(x, tm.patch_embed.proj.weight).flatten(1)
        ours = F.conv2d(up, model.patch_embed.proj.weight).flatten(1)
    assert_close(ours, theirs)


def test_sam_original_layout():
    """Segment Anything's own checkpoint: the image encoder under ``image_encoder.``, its MLP as
    ``lin1`` / ``lin2``, beside prompt-encoder and mask-decoder tensors that are not ours."""
    tm = randomize(timm.create_model("samvit_base_patch16", pretrained=False, embed_dim=64, num_heads=2, depth=2,
                                     img_size=64, window_size=2, global_attn_indexes=[1], neck_chans=32)).eval()
    sd = {"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v.detach().clone() for k, v in tm.state_dict().items()}
    sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.zeros(2, 8)
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 8)
    _check(tm, sd, note="SAM layout, converted by timm's timm.models.vision_transformer_sam")


def test_xcit_original_layout():
    """facebookresearch/xcit's checkpoint: ``pos_embeder`` and one fused ``qkv`` in each class
    attention block (timm keeps q, k, v apart), wrapped in ``{"model": ...}``."""
    tm = randomize(timm.create_model("xcit_nano_12_p16_224", pretrained=False, depth=1, img_size=64)).eval()
    sd = {k.replace("pos_embed.", "pos_embeder."): v.detach().clone() for k, v in tm.state_dict().items()}
    for i in range(len(tm.cls_attn_blocks)):
        p = f"cls_attn_blocks.{i}.attn."
        for kind in ("weight", "bias"):
            sd[f"{p}qkv.{kind}"] = torch.cat([sd.pop(f"{p}{n}.{kind}") for n in "qkv"])
    _check(tm, {"model": sd}, note="XCiT original layout")


def test_open_clip_layout_with_a_timm_trunk():
    """open_clip's ``TimmModel`` tower: timm's own names under ``visual.trunk.``, beside the text
    tower's tensors."""
    tm = randomize(timm.create_model("vit_base_patch16_clip_224", pretrained=False, **SMALL, num_classes=0)).eval()
    sd = {"visual.trunk." + k: v.detach().clone() for k, v in tm.state_dict().items()}
    sd["text.token_embedding.weight"] = torch.zeros(10, 8)
    sd["logit_scale"] = torch.tensor(4.6)
    _check(tm, sd, note="open_clip layout")


def test_dinov3_original_layout():
    """DINOv3's own checkpoint: ``storage_tokens`` for the registers, ``ls1`` / ``ls2`` layer
    scales, a pretraining ``mask_token`` and the RoPE ``periods`` buffer (recomputed, not loaded)."""
    tm = randomize(timm.create_model("vit_small_patch16_dinov3", pretrained=False, depth=2, img_size=64)).eval()
    names = {"reg_token": "storage_tokens", "gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}
    sd = {}
    for k, v in tm.state_dict().items():
        for timm_name, original in names.items():
            k = k.replace(timm_name, original)
        sd[k] = v.detach().clone()
    sd["mask_token"] = torch.zeros(1, tm.embed_dim)
    sd["rope_embed.periods"] = torch.ones(16)
    _check(tm, sd, note="DINOv3 layout, converted by timm's timm.models.eva")
