"""The result of :func:`vitlab.analyze`: one variant's FLOPs, parameters, tokens and breakdowns."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

KIND_KEYS: tuple[str, ...] = ("patch_embed", "pos_embed", "attention", "mlp", "norm", "pool", "head", "other")
"""The per-kind breakdown: the component kinds that cost FLOPs, the classifier head, and ``other``
(ops outside any component, e.g. a block's own layer scale)."""


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
    flop_counter: Optional[int] = None
    derived: bool = False
    derivation: Optional[str] = None
    method: str = "full"
    device: str = "meta"

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
            "activations": self.activations,
            "img_size": "x".join(str(s) for s in self.img_size),
            "batch_size": self.batch_size,
        }
        row.update({f"flops.{k}": self.by_kind.get(k, 0) for k in KIND_KEYS})
        row["flop_counter"] = self.flop_counter
        row["unsupported"] = ";".join(f"{k}:{v}" for k, v in sorted(self.unsupported.items()))
        row["derived"] = self.derived
        return row

    def __str__(self) -> str:
        derived = " (derived)" if self.derived else ""
        return (f"{self.name}: {self.gflops:.2f} GFLOPs{derived}, {self.mparams:.2f} M params, "
                f"{self.tokens} tokens at {self.img_size[0]}x{self.img_size[1]}, batch {self.batch_size}")
