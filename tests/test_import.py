"""``import vitlab`` stays light: no timm, no fvcore, no matplotlib, each loaded only when a feature
that needs it runs (checked once, in one fresh interpreter).

Reference: ``sys.modules`` of a fresh interpreter, read at each step of the script below; the
function object ``vitlab.analysis`` defines; the closed-form count of a one-block ViT.
"""
from __future__ import annotations

import json

from test_flops import closed_form

HEAVY = ("timm", "fvcore", "matplotlib", "vitlab.analysis")

SCRIPT = """
import json, sys
heavy = {heavy!r}
loaded = lambda: sorted(m for m in heavy if m in sys.modules)
import vitlab
after_import = loaded()
model = vitlab.build_model({{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}, device="meta")
vitlab.load_spec("vit_tiny_patch16_224")
after_build = loaded()
# the lazy exports of timm interop and checkpoints, and the CLI's timm commands: none needs timm yet
vitlab.load_timm_weights; vitlab.save; vitlab.load
from_timm = vitlab.spec_from_timm
import vitlab.cli.timm_cmds
after_lookup = loaded()
analyze = vitlab.analyze  # the lazy attribute: imports vitlab.analysis, still not fvcore
after_analysis = loaded()
resolves = analyze is sys.modules["vitlab.analysis"].analyze and analyze.__module__ == "vitlab.analysis"
flops = analyze({spec!r}).flops
after_count = loaded()
spec = from_timm("vit_tiny_patch16_224")  # converting a timm model is what needs timm
print(json.dumps({{
    "after_import": after_import, "after_build": after_build, "after_lookup": after_lookup,
    "after_analysis": after_analysis, "resolves": resolves, "flops": flops, "after_count": after_count,
    "after_call": loaded(), "exported": "spec_from_timm" in vitlab.__all__,
    "converted": [spec.embed_dim, spec.depth, spec.num_heads],
}}))
"""
SPEC = {"name": "t", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 10}


def test_import_vitlab_is_light(run_python):
    res = run_python("-c", SCRIPT.format(heavy=HEAVY, spec=SPEC))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["after_import"] == []
    assert report["after_build"] == []  # building a model needs none of them
    # timm interop, checkpoints and the timm commands are exported and can be looked up without timm
    assert report["exported"] is True and report["after_lookup"] == []
    # vitlab.analyze is vitlab.analysis.analyze, imported on first look-up; fvcore only when it counts
    assert report["after_analysis"] == ["vitlab.analysis"] and report["resolves"] is True
    assert report["after_count"] == ["fvcore", "vitlab.analysis"]
    assert report["flops"] == sum(closed_form(32, 1, 8, img=32, classes=10).values())
    # timm arrives only when spec_from_timm is called (and the call really used it: ViT-Ti/16 is 192
    # wide, 12 deep, 3 heads in timm's model table)
    assert "timm" in report["after_call"] and "matplotlib" not in report["after_call"]
    assert report["converted"] == [192, 12, 3]
