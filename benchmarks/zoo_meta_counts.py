"""Every model of timm's isotropic ViT zoo that vitlab reads, counted with ``analyze(method="full")``:
each must count on the meta device, with no fallback to real weights (``Report.device == "meta"``).
Prints the seconds per family and in all, and the slowest models; exits 1 on any fallback or error.
(The suite checks one model per family and feature: ``tests/test_count_on_meta.py``.)

    .venv/bin/python benchmarks/zoo_meta_counts.py              # every family
    .venv/bin/python benchmarks/zoo_meta_counts.py eva beit     # only these
"""
from __future__ import annotations

import sys
import time

import timm

import vitlab
from vitlab.timm_interop import spec_from_timm, zoo


def main(argv: list[str]) -> int:
    families = argv or zoo.families()
    bad: list[str] = []
    times: list[tuple[float, str]] = []
    print("| family | not read | counted | on meta | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for family in families:
        counted = on_meta = not_read = 0
        spent = 0.0
        for name in timm.list_models(module=family):
            try:
                spec = spec_from_timm(name)
            except Exception:  # noqa: BLE001  (refused or unbuildable: zoo_coverage.py reports those)
                not_read += 1
                continue
            start = time.perf_counter()
            try:
                report = vitlab.analyze(spec, method="full")
            except Exception as exc:  # noqa: BLE001  (reported, then the exit status says so)
                bad.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            seconds = time.perf_counter() - start
            spent += seconds
            times.append((seconds, name))
            counted += 1
            if report.device == "meta":
                on_meta += 1
            else:
                bad.append(f"{name}: counted on {report.device}, not on meta")
        print(f"| {family} | {not_read} | {counted} | {on_meta} | {spent:.1f} |", flush=True)
    total = sum(t for t, _ in times)
    print(f"\n{len(times)} models counted in {total:.1f} s ({total / max(len(times), 1):.2f} s each); slowest: "
          + ", ".join(f"{n} {t:.1f} s" for t, n in sorted(times, reverse=True)[:5]))
    for line in bad:
        print("FAIL", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
