"""``vitlab flops vit_base_patch16_224`` against fvcore's ``FlopCountAnalysis`` on timm's
``vit_base_patch16_224``, alternating in one process (imports warm on both sides). Prints time ratios
vitlab / fvcore-on-timm (target <= 1.2).

    .venv/bin/python benchmarks/bench_flops.py [--rounds 5]

Ratios printed:
  * vitlab flops (CLI, from the recipe name: load, build, count, FlopCounterMode, JSON) against
    ``FlopCountAnalysis(model, x).total()`` on an already-built timm model -- the strict one;
  * the same against ``timm.create_model`` + ``FlopCountAnalysis`` (what a user types);
  * for information, ``vitlab.analyze`` on an already-built real vitlab model (no meta tensors:
    one real traced forward plus one real FlopCounterMode forward).
"""
from __future__ import annotations

import argparse
import json
import logging
import warnings

import torch

from vitlab.timing import alternate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="vit_base_patch16_224")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-real", action="store_true", help="skip the informational real-model ratio")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    import timm
    from click.testing import CliRunner
    from fvcore.nn import FlopCountAnalysis

    import vitlab
    import vitlab.cli.analysis_cmds  # noqa: F401
    from vitlab.cli import cli

    runner = CliRunner()
    x = torch.randn(1, 3, 224, 224)

    def ours() -> int:
        result = runner.invoke(cli, ["flops", args.recipe, "--format", "json"], catch_exceptions=False)
        return json.loads(result.stdout)["flops"]

    theirs_model = timm.create_model(args.recipe, pretrained=False).eval()

    def theirs() -> int:
        fca = FlopCountAnalysis(theirs_model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return fca.total()

    def theirs_with_create() -> int:
        model = timm.create_model(args.recipe, pretrained=False).eval()
        fca = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return fca.total()

    print(f"{args.recipe}: vitlab {ours() / 1e9:.2f} GFLOPs; plain fvcore on timm (fused attention) {theirs() / 1e9:.2f} GFLOPs")
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads")

    r = alternate(ours, theirs, rounds=args.rounds, warmup=1)
    print(f"vitlab flops / FlopCountAnalysis(timm model): {r['ratio']:.3f} "
          f"({r['a_median_s']:.3f} s vs {r['b_median_s']:.3f} s; median pair ratio {r['pair_ratio_median']:.3f}; target <= 1.2)")
    r = alternate(ours, theirs_with_create, rounds=args.rounds, warmup=1)
    print(f"vitlab flops / (timm.create_model + FlopCountAnalysis): {r['ratio']:.3f} "
          f"({r['a_median_s']:.3f} s vs {r['b_median_s']:.3f} s)")
    if not args.skip_real:
        real = vitlab.build_model(args.recipe, seed=0).eval()
        r = alternate(lambda: vitlab.analyze(real), theirs, rounds=max(3, args.rounds // 2), warmup=1)
        print(f"[info] analyze(real vitlab model, no meta tensors) / FlopCountAnalysis(timm model): {r['ratio']:.3f} "
              f"({r['a_median_s']:.3f} s vs {r['b_median_s']:.3f} s)")


if __name__ == "__main__":
    main()
