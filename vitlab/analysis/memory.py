"""Predicted memory of a training step and of inference, from shapes alone (no run), and the
guard that refuses, before anything is allocated, a model or batch the machine cannot hold.

What autograd keeps for backward is read, not modelled: a meta-device forward in training mode
runs under ``torch.autograd.graph.saved_tensors_hooks`` with parameters that require gradients, and
the unique storages packed (parameters left out: they are counted once, as parameters) are summed.
Module forward hooks attribute each storage to the component kind that saved it first.

Attention is the one operator whose saved set depends on the backend: the meta device would take
the math path (which keeps the (B, heads, N, N) probabilities), while CPU's flash kernel and CUDA's
flash / memory-efficient kernels keep only q, k, v, the output and a log-sum-exp. The pass reroutes
``scaled_dot_product_attention`` on meta tensors to the fused CPU kernel's op so the saved set is
the fused one.

Estimates, in bytes at the batch size and dtype:

* ``params_bytes``: parameters and buffers; ``grads_bytes``: one gradient per trainable parameter,
  in the parameter's dtype; ``optimizer_bytes``: AdamW's two moments, fp32 (8 bytes a parameter).
* ``activations_bytes``: what autograd saves. With gradient checkpointing each block keeps only its
  input, and one block's saved set is rebuilt at a time in backward: the sum of block inputs plus
  the largest block's saved set, plus what the embedding and the head save.
* ``train_peak_bytes``: parameters + gradients + optimizer + activations + the transient working
  set (the largest piece's saved set again: the gradients flowing back through one block are as
  large as what it saved) -- see ``TRANSIENT`` below.
* ``infer_peak_bytes``: parameters + the largest live set of a no-grad forward, estimated as the
  largest over pieces (embedding, each block, head) of: the piece's input (the residual stream stays
  alive) + the largest leaf module's input and output.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import VitlabError
from ..limits import MAX_BATCH  # noqa: F401  (re-exported: the batch bound lives with the other limits)

MEMORY_KEYS = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "train_peak_bytes",
               "infer_peak_bytes")
"""The keys of ``Report.memory``, in order."""

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``--dtype`` choices: the dtype parameters and activations are held in."""

ADAMW_BYTES_PER_PARAM = 8  # exp_avg and exp_avg_sq, fp32


MAX_MEMORY_ENV = "VITLAB_MAX_MEMORY"


# --- sizes --------------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


MAX_BYTES = 2**60
"""The largest size a memory option accepts (1 EiB): beyond it no machine exists, and the byte
counts derived from it would overflow."""


def _size_error(option: str, text: object, why: str = "") -> VitlabError:
    return VitlabError(f"{option}: expected a size such as 32GiB, 1.5GB or 512MiB "
                       f"(units: {', '.join(u for u in _UNITS if u)}; at most 1 EiB){why}, got {str(text)[:40]!r}")


def _bounded(value: float, option: str, text: object) -> int:
    """``value`` bytes as an int, refused if not finite, negative, zero or above ``MAX_BYTES``."""
    if not math.isfinite(value) or value < 1 or value > MAX_BYTES:
        raise _size_error(option, text, "; a finite size of at least 1 byte")
    return int(value)


def parse_bytes(text: str, option: str = MAX_MEMORY_ENV) -> int:
    """``"32GiB"``, ``"1.5 GB"``, ``"512MiB"`` or a plain byte count -> bytes (1 B to 1 EiB)."""
    m = re.fullmatch(r"\s*([0-9]{1,30}\.?[0-9]{0,30})\s*([a-zA-Z]*)\s*", str(text)[:100])
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise _size_error(option, text)
    return _bounded(float(m.group(1)) * _UNITS[unit], option, text)


def parse_gib(text: str, option: str = "--fit") -> int:
    """``--fit 16`` (GiB) or ``--fit 16GiB`` -> bytes; ``inf``, ``nan`` and ``1e999`` are refused."""
    try:
        value = float(text)
    except ValueError:
        return parse_bytes(text, option)
    return _bounded(value * 2**30, option, text)


def human(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def available_bytes() -> int | None:
    """Memory the machine can still give: ``MemAvailable`` of ``/proc/meminfo``, else free pages
    (``os.sysconf``), else ``None`` (unknown: nothing is refused)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_cap(max_memory: str | int | None = None) -> tuple[int | None, str]:
    """The byte budget a command may allocate and where it comes from: ``max_memory`` (an option),
    else ``VITLAB_MAX_MEMORY``, else the machine's available memory."""
    if max_memory is not None:
        return (max_memory if isinstance(max_memory, int) else parse_bytes(max_memory, "--max-memory")), "--max-memory"
    env = os.environ.get(MAX_MEMORY_ENV)
    if env:
        return parse_bytes(env), MAX_MEMORY_ENV
    return available_bytes(), "available memory"


def check_batch(batch_size: int, option: str = "--batch-size") -> None:
    """Refuse a batch size no command can mean (``10**12``), before any work."""
    if not isinstance(batch_size, int) or batch_size < 1 or batch_size > MAX_BATCH:
        raise VitlabError(f"{option}: expected an integer from 1 to {MAX_BATCH}, got {batch_size}")


def check_fits(need_bytes: int, what: str, *, max_memory: str | int | None = None, device: str = "cpu") -> None:
    """Refuse, in one line, an allocation of ``need_bytes`` that cannot fit.

    Call before building or running a real model. On CUDA the budget is the device's free memory;
    on CPU it is ``memory_cap(max_memory)``. ``what`` names the job (``"ViT-B training at batch 64"``).

    Raises:
        VitlabError: the estimate exceeds the budget (the message gives both and how to raise it).
    """
    if str(device).startswith("meta"):
        return
    if str(device).startswith("cuda") and max_memory is None and not os.environ.get(MAX_MEMORY_ENV):
        try:
            cap, source = torch.cuda.mem_get_info(torch.device(device))[0], f"free memory of {device}"
        except Exception:  # noqa: BLE001  (no usable device: the command reports that itself)
            return
    else:
        cap, source = memory_cap(max_memory)
    if cap is not None and need_bytes > cap:
        raise VitlabError(f"{what} needs about {human(need_bytes)} (parameters + activations, predicted) but "
                          f"{source} is {human(cap)}; lower --batch-size, or raise the cap with "
                          f"{MAX_MEMORY_ENV}=64GiB if the estimate is wrong")


# --- reading what autograd saves ------------------------------------------------------------------------

class _FusedAttentionOnMeta(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` on meta tensors -> the fused CPU kernel's op, whose
    autograd node saves what the fused kernels save (not the math path's probabilities)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and args and args[0].device.type == "meta":
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            dropout = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
            if q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and not kwargs.get("enable_gqa"):
                try:
                    with torch._C.DisableTorchFunction():
                        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                            q, k, v, dropout, causal, attn_mask=mask, scale=kwargs.get("scale"))[0]
                except Exception:  # noqa: BLE001  (shapes the kernel refuses: the math path's set)
                    pass
        return func(*args, **kwargs)


@dataclass
class PieceMemory:
    """What one piece of a forward (the embedding, a block, the head, or a whole model) holds."""

    saved_by_kind: dict[str, int] = field(default_factory=dict)
    """Bytes autograd saves for backward, by the component kind that saved them."""
    input_bytes: int = 0
    """The piece's input: what a checkpointed block keeps."""
    live_bytes: int = 0
    """Inference estimate: input + the largest leaf module's input and output."""

    @property
    def saved(self) -> int:
        return sum(self.saved_by_kind.values())


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())


def measure_piece(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], root: nn.Module,
                  kinds: dict[str, str], skip: set[int], prefix: str = "") -> tuple[Any, PieceMemory]:
    """Run ``fn(*inputs)`` (meta tensors, grad enabled) and read what autograd saves.

    ``root``'s modules are attributed through ``kinds`` (module name -> kind, names relative to
    ``root`` after dropping ``prefix``); ``skip`` holds the storages (``_cdata``) of parameters.
    Returns ``fn``'s output and the piece's memory."""
    names = {id(m): n.removeprefix(prefix) for n, m in root.named_modules()}
    leaves = {id(m) for m in root.modules() if next(iter(m.children()), None) is None}
    stack: list[str] = []
    saved: dict[int, tuple[str, int]] = {}
    largest_leaf = 0

    def pre(module, args):
        if id(module) in names:
            stack.append(names[id(module)])

    def post(module, args, out):
        nonlocal largest_leaf
        if id(module) in names:
            if stack:
                stack.pop()
            if id(module) in leaves:
                largest_leaf = max(largest_leaf, _storage_bytes([*_tensors(args), *_tensors(out)]))

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        key = s._cdata
        if key not in skip and key not in saved:
            saved[key] = (kinds.get(stack[-1], "other") if stack else "other", s.nbytes())
        return t

    hooks = [nn.modules.module.register_module_forward_pre_hook(pre),
             nn.modules.module.register_module_forward_hook(post)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _FusedAttentionOnMeta(), torch.enable_grad():
            out = fn(*inputs)
    finally:
        for h in hooks:
            h.remove()
    by_kind: dict[str, int] = {}
    for kind, nbytes in saved.values():
        by_kind[kind] = by_kind.get(kind, 0) + nbytes
    inp = _storage_bytes(inputs)
    return out, PieceMemory(by_kind, inp, inp + largest_leaf)


# --- the prediction ---------------------------------------------------------------------------------------

TRANSIENT = "largest piece's saved set"
"""What ``train_peak_bytes`` adds on top of the held memory: in backward, the gradients flowing
through one block are about as large as the activations that block saved."""


def combine(params_bytes: int, trainable: int, grad_bytes_per_param: int, embed: PieceMemory,
            blocks: list[PieceMemory], head: PieceMemory, checkpointing: bool) -> tuple[dict[str, int], dict[str, int]]:
    """The ``memory`` dict and its per-kind breakdown from the pieces' memory (blocks in order)."""
    pieces = [embed, *blocks, head]
    by_kind: dict[str, int] = {}
    if checkpointing and blocks:
        held = [embed, head, max(blocks, key=lambda b: b.saved)]
        by_kind["checkpoint inputs"] = sum(b.input_bytes for b in blocks)
    else:
        held = pieces
    for p in held:
        for k, v in p.saved_by_kind.items():
            by_kind[k] = by_kind.get(k, 0) + v
    activations = sum(by_kind.values())
    grads = trainable * grad_bytes_per_param
    optimizer = trainable * ADAMW_BYTES_PER_PARAM
    transient = max(p.saved for p in pieces)
    memory = {
        "params_bytes": params_bytes,
        "grads_bytes": grads,
        "optimizer_bytes": optimizer,
        "activations_bytes": activations,
        "train_peak_bytes": params_bytes + grads + optimizer + activations + transient,
        "infer_peak_bytes": params_bytes + max(p.live_bytes for p in pieces),
    }
    return memory, {k: v for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]) if v}


def meta_state(model: nn.Module, dtype: torch.dtype | None, prefix: str = "") -> dict[str, torch.Tensor]:
    """Meta stand-ins of ``model``'s parameters and buffers (floating ones in ``dtype``), each
    parameter requiring gradients as the original does: for ``torch.func.functional_call``."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
        m = torch.empty(t.shape, dtype=dt, device="meta")
        if isinstance(t, nn.Parameter) and t.requires_grad:
            m.requires_grad_(True)
        out[prefix + name] = m
    return out


@contextlib.contextmanager
def training_mode(model: nn.Module, train: bool = True) -> Iterator[None]:
    """``model`` in training (or inference) mode without checkpointing -- pieces' saved sets are
    read whole, checkpointing is applied when combining -- restored afterwards."""
    was_training, was_ckpt = model.training, getattr(model, "grad_checkpointing", None)
    model.train(train)
    if was_ckpt is not None:
        model.grad_checkpointing = False
    try:
        yield
    finally:
        model.train(was_training)
        if was_ckpt is not None:
            model.grad_checkpointing = was_ckpt


def predict_module(model: nn.Module, images: torch.Tensor, dtype: torch.dtype | None = None,
                   kinds: dict[str, str] | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """The prediction for any module, traced whole (no pieces: checkpointing is not modelled)."""
    from torch.func import functional_call

    state = meta_state(model, dtype)
    skip = {t.untyped_storage()._cdata for t in state.values()}
    x = torch.empty(images.shape, dtype=dtype or images.dtype, device="meta")
    with training_mode(model):
        _, piece = measure_piece(lambda im: functional_call(model, state, (im,)), (x,), model, kinds or {}, skip)
    params_bytes = sum(t.numel() * t.element_size() for t in state.values())
    trainable = sum(t.numel() for t in state.values() if t.requires_grad)
    grad_bytes = (dtype or torch.float32).itemsize if dtype is not None else 4
    return combine(params_bytes, trainable, grad_bytes, PieceMemory(), [], piece, False)


def largest_fitting_batch(memory_at: Callable[[int], int], budget: int, limit: int = MAX_BATCH) -> int:
    """The largest batch whose predicted training peak fits ``budget`` (0 if not even one does).

    Memory is affine in the batch size (parameters and optimizer fixed, activations linear), so
    two predictions give the line; the answer is checked against a third at the batch found."""
    m1, m2 = memory_at(1), memory_at(2)
    per_image, fixed = m2 - m1, 2 * m1 - m2
    if m1 > budget:
        return 0
    if per_image <= 0:
        return limit
    batch = min(limit, (budget - fixed) // per_image)
    while batch > 1 and memory_at(batch) > budget:  # only if the line was off (rounding): step down
        batch -= max(1, batch // 100)
    return max(batch, 1)
