"""An MLP ratio gives a buildable MLP in every stage and layer entry it reaches, or one error there.

Before, a zero-width or astronomically wide MLP inside a stage or a ``layers`` entry passed
validation and then overflowed torch's size calculation at build. The widths are the closed form
``int(stage embed_dim * mlp_ratio)``.
"""
from __future__ import annotations

import pytest

import vitlab
from vitlab.errors import SpecError
from vitlab.limits import LIMITS

from conftest import TINY

STAGED = {**{k: v for k, v in TINY.items() if k not in ("depth", "embed_dim", "num_heads")},
          "stages": [{"depth": 1, "embed_dim": 32, "num_heads": 2},
                     {"depth": 1, "embed_dim": 64, "num_heads": 2, "transition": "patch_merge"}],
          "pos_embed": "none"}


def _error(data) -> str:
    with pytest.raises(SpecError) as err:
        vitlab.load_spec(data)
    (line,) = err.value.lines()
    return line


@pytest.mark.parametrize("data, where, says", [
    ({**TINY, "mlp_ratio": 0.01}, "mlp_ratio", "below 1"),
    ({**TINY, "layers": [{"at": 1, "mlp_ratio": 0.01}]}, "layers.0.mlp_ratio", "below 1"),
    ({**TINY, "layers": [{"at": 1, "mlp_ratio": 1e12}]}, "layers.0.mlp_ratio", "beyond what can be built"),
    ({**STAGED, "mlp_ratio": 0.02}, "mlp_ratio", "below 1 in stage 0"),  # 32 * 0.02 < 1 <= 64 * 0.02
    ({**STAGED, "mlp_ratio": LIMITS["mlp_hidden_dim"] / 40}, "mlp_ratio", "in stage 1"),  # too wide at 64 only
    ({**STAGED, "layers": [{"at": 1, "mlp_ratio": 1e9}]}, "layers.0.mlp_ratio", "in stage 1"),
], ids=["global-zero", "layer-zero", "layer-huge", "stage-zero", "stage-huge", "staged-layer-huge"])
def test_bad_widths_are_one_error_at_their_ratio(data, where, says):
    line = _error(data)
    assert line.startswith(f"{where}: ") and says in line, line


def test_a_ratio_only_reaching_a_narrow_stage_is_fine():
    spec = vitlab.load_spec({**STAGED, "layers": [{"at": 0, "mlp_ratio": LIMITS["mlp_hidden_dim"] / 32}]})
    assert spec.layers[0].mlp_ratio == LIMITS["mlp_hidden_dim"] / 32  # 32 * ratio is exactly the limit
