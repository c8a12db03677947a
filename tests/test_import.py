"""``import vitlab`` stays light: no timm, no fvcore (checked in a fresh interpreter)."""
from __future__ import annotations

import json

HEAVY = ("timm", "fvcore", "matplotlib")

SCRIPT = """
import json, sys
heavy = {heavy!r}
import vitlab
after_import = sorted(m for m in heavy if m in sys.modules)
model = vitlab.build_model({{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}, device="meta")
vitlab.load_spec("vit_tiny_patch16_224")
after_build = sorted(m for m in heavy if m in sys.modules)
print(json.dumps({{"after_import": after_import, "after_build": after_build, "timm_loaded_lazily": "spec_from_timm" in vitlab.__all__}}))
"""


def test_import_vitlab_is_light(run_python):
    res = run_python("-c", SCRIPT.format(heavy=HEAVY))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["after_import"] == []
    assert report["after_build"] == []  # building a model needs neither
