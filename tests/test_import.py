"""``import vitlab`` stays light: no timm, no fvcore (checked in a fresh interpreter).

Reference: ``sys.modules`` of a fresh interpreter, read at each step of the script below. The
timm features are exported names, yet timm is imported only when one of them runs.
"""
from __future__ import annotations

import json

HEAVY = ("timm", "fvcore", "matplotlib")

SCRIPT = """
import json, sys
heavy = {heavy!r}
loaded = lambda: sorted(m for m in heavy if m in sys.modules)
import vitlab
after_import = loaded()
model = vitlab.build_model({{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}, device="meta")
vitlab.load_spec("vit_tiny_patch16_224")
after_build = loaded()
from_timm = vitlab.spec_from_timm  # the lazy export: vitlab.timm_interop, which defers timm itself
after_lookup = loaded()
spec = from_timm("vit_tiny_patch16_224")  # converting a timm model is what needs timm
print(json.dumps({{
    "after_import": after_import, "after_build": after_build, "after_lookup": after_lookup,
    "after_call": loaded(), "exported": "spec_from_timm" in vitlab.__all__,
    "converted": [spec.embed_dim, spec.depth, spec.num_heads],
}}))
"""


def test_import_vitlab_is_light(run_python):
    res = run_python("-c", SCRIPT.format(heavy=HEAVY))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["after_import"] == []
    assert report["after_build"] == []  # building a model needs neither
    # timm is loaded lazily: spec_from_timm is exported and can be looked up without timm, and
    # timm arrives only when it is called (and the call really used it: ViT-Ti/16 is 192 wide,
    # 12 deep, 3 heads in timm's model table)
    assert report["exported"] is True
    assert report["after_lookup"] == []
    assert "timm" in report["after_call"] and "fvcore" not in report["after_call"]
    assert report["converted"] == [192, 12, 3]
