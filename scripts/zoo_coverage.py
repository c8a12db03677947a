"""Print how much of timm's isotropic ViT zoo ``vitlab.spec_from_timm`` reads and writes back, per timm module,
as the Markdown table of the README's timm section.

    python scripts/zoo_coverage.py                 # the table
    python scripts/zoo_coverage.py --refusals      # plus every refusal, grouped by reason
    python scripts/zoo_coverage.py eva beit        # only these families

Every model is built with ``pretrained=False`` on the meta device: nothing is downloaded or allocated.
Each model read is also sent back to timm (``timm_class(spec)(**timm_kwargs(spec))`` on meta) and
read again: the *back to timm* column counts those giving the same spec. Exits 1 when reading or
exporting any model crashes instead of being refused with a vitlab error.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from vitlab.timm_interop import zoo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help=f"timm modules (default: {', '.join(zoo.FAMILIES)})")
    parser.add_argument("--refusals", action="store_true", help="list every refusal, grouped by reason")
    args = parser.parse_args(argv)
    unknown = [f for f in args.families if f not in zoo.FAMILIES]
    if unknown:
        parser.error(f"unknown family {', '.join(unknown)}; known: {', '.join(zoo.FAMILIES)}")

    from vitlab.plugins import make_plugin_manager

    builtins = make_plugin_manager(entry_points=False)[1]  # vitlab's built-ins, not what is installed
    table = zoo.coverage(args.families or None, registry=builtins)
    print(zoo.markdown(table))
    crashes = [o for cov in table for o in cov.outcomes
               if o.kind == "crash" or o.export_reason.startswith("crash")]
    if args.refusals or crashes:
        for cov in table:
            by_reason: dict[str, list[str]] = defaultdict(list)
            for o in cov.outcomes:
                if o.kind != "read":
                    by_reason[f"[{o.kind}] {o.reason}"].append(o.name)
                elif not o.exported:
                    kind = "export crash" if o.export_reason.startswith("crash") else "not exported"
                    by_reason[f"[{kind}] {o.export_reason}"].append(o.name)
            if by_reason and (args.refusals or any("crash]" in r for r in by_reason)):
                print(f"\n### {cov.family}")
                for reason, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
                    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                    print(f"- {len(names)} x {reason}: {shown}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
