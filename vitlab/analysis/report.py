"""The result of :func:`vitlab.analyze`: one variant's FLOPs, parameters, tokens and breakdowns."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

KIND_KEYS: tuple[str, ...] = ("patch_embed", "pos_embed", "attention", "mlp", "norm", "transition", "pool", "head",
                              "other")
"""The per-kind breakdown: the component kinds that cost FLOPs (``transition`` between stages), the
classifier head, and ``other`` (ops outside any component, e.g. a block's own layer scale)."""


@dataclass
class Report:
    """FLOPs and parameters of one model at one input size.

    ``flops`` follows fvcore (one fused multiply-add counts 1; the "GFLOPs" of timm's tables and
    most papers). ``flop_counter`` is the second opinion of ``torch.utils.flop_counter``
    (2 FLOPs per multiply-add, no norms). When ``derived`` is true the FLOP figures were scaled
    from distinct blocks counted once; ``derivation`` says how.
    """

    name: str
    flops: int
    params: int
    trainable_params: int
    tokens: Optional[int]
    activations: int
    img_size: tuple[int, int]
    batch_size: int
    by_kind: dict[str, int]
    by_module: dict[str, int]
    by_operator: dict[str, int] = field(default_factory=dict)
    unsupported: dict[str, int] = field(default_factory=dict)
    free_ops: dict[str, int] = field(default_factory=dict)
    free_why: dict[str, str] = field(default_factory=dict)
    """Why each of ``free_ops`` counts 0: the reason its declaration gave (``free=``), vitlab's or a plugin's."""
    flop_counter: Optional[int] = None
    derived: bool = False
    derivation: Optional[str] = None
    method: str = "full"
    device: str = "meta"
    stage_tokens: list[int] = field(default_factory=list)
    """Tokens entering each stage's first block (one entry without ``stages``)."""
    tokens_out: Optional[int] = None
    """Tokens leaving the last block: fewer than ``tokens`` after token merging or pooling stages."""
    memory: dict[str, int] = field(default_factory=dict)
    """Predicted bytes at the batch size (``vitlab.analysis.memory``): ``params_bytes``,
    ``grads_bytes``, ``optimizer_bytes`` (AdamW, fp32), ``activations_bytes`` (saved for backward),
    ``train_peak_bytes``, ``infer_peak_bytes``."""
    memory_by_kind: dict[str, int] = field(default_factory=dict)
    """``activations_bytes`` by the component kind that saved them (``checkpoint inputs`` with
    gradient checkpointing)."""
    dtype: str = "fp32"
    """The dtype the memory prediction holds weights and activations in."""
    grad_checkpointing: bool = False
    fit: Optional[dict[str, int]] = None
    """With ``--fit``: ``{budget_bytes, batch_size}``, the largest training batch predicted to fit."""
    measured: Optional[dict[str, Any]] = None
    """With ``--measure``: ``{device, batch_size, infer_ms, train_step_ms, infer_peak_bytes,
    train_peak_bytes}`` of a real run (``vitlab.measure``)."""

    def tokens_text(self) -> str:
        """``"785→197→50"``: the tokens entering each stage, then leaving the last block when that
        differs (``"197→29"`` for token merging inside one stage); ``"-"`` when unknown."""
        if self.tokens is None:
            return "-"
        steps = list(self.stage_tokens) or [self.tokens]
        if self.tokens_out is not None and self.tokens_out != steps[-1]:
            steps.append(self.tokens_out)
        return "→".join(str(t) for t in steps)

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def mparams(self) -> float:
        return self.params / 1e6

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (``img_size`` as ``[height, width]``)."""
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["img_size"] = tuple(known["img_size"])
        return cls(**known)

    def summary(self) -> dict[str, Any]:
        """One flat row: the headline numbers and the per-kind FLOPs (``flops.<kind>``)."""
        row: dict[str, Any] = {
            "name": self.name,
            "flops": self.flops,
            "gflops": round(self.gflops, 4),
            "params": self.params,
            "mparams": round(self.mparams, 4),
            "trainable_params": self.trainable_params,
            "tokens": self.tokens,
            "stage_tokens": "→".join(str(t) for t in self.stage_tokens),
            "tokens_out": self.tokens_out,
            "activations": self.activations,
            "img_size": "x".join(str(s) for s in self.img_size),
            "batch_size": self.batch_size,
        }
        row.update({f"flops.{k}": self.by_kind.get(k, 0) for k in KIND_KEYS})
        row["flop_counter"] = self.flop_counter
        row.update({f"memory.{k}": v for k, v in self.memory.items()})
        for k in ("infer_ms", "train_step_ms", "infer_peak_bytes", "train_peak_bytes"):
            if self.measured:
                row[f"measured.{k}"] = self.measured.get(k)
        if self.fit:  # --fit: the budget and the largest training batch predicted to fit in it
            row.update({f"fit.{k}": v for k, v in self.fit.items()})
        row["unsupported"] = ";".join(f"{k}:{v}" for k, v in sorted(self.unsupported.items()))
        row["derived"] = self.derived
        return row

    def __str__(self) -> str:
        derived = " (derived)" if self.derived else ""
        return (f"{self.name}: {self.gflops:.2f} GFLOPs{derived}, {self.mparams:.2f} M params, "
                f"{self.tokens_text()} tokens at {self.img_size[0]}x{self.img_size[1]}, batch {self.batch_size}")
