#!/usr/bin/env python3
"""vitlab's two everyday jobs, from a fresh clone with nothing but python3.

    python3 dev.py compare   # install into .venv, then compare the bundled recipes (table, out/)
    python3 dev.py test      # install into .venv with test extras and plugins/, then run the tests

The virtual environment is created on first use and re-installed only when a pyproject.toml
changes (vitlab and the plugins are installed editable). ``VITLAB_VENV`` picks another location.
Extra arguments after the job go to the underlying command (``python3 dev.py test -k flops``).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("VITLAB_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def run(*cmd: str | os.PathLike, **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def plugin_dirs() -> list[Path]:
    return sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))


def ensure_env(with_tests: bool) -> None:
    """Create the venv and (re)install vitlab when its inputs changed."""
    if not PY.exists():
        run(sys.executable, "-m", "venv", VENV)
    inputs = [ROOT / "pyproject.toml", *(d / "pyproject.toml" for d in plugin_dirs())]
    digest = hashlib.sha256(b"tests" if with_tests else b"main")
    for path in inputs:
        digest.update(path.read_bytes())
    stamp = VENV / f".vitlab-{'test' if with_tests else 'main'}.sha256"
    if stamp.exists() and stamp.read_text() == digest.hexdigest():
        return
    # torch is left to pip, which resolves it together with torchvision (timm needs both)
    target = f"{ROOT}[test]" if with_tests else str(ROOT)
    run(PY, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-e", target)
    if with_tests:
        for d in plugin_dirs():
            run(PY, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps", "-e", d)
    stamp.write_text(digest.hexdigest())


# The bundled recipes in two comparisons: the standard sizes (and the hierarchical Swin-T, Hiera-T and PVTv2-B0) against
# ViT-B/16, and the one-axis ViT-Tiny variants against ViT-Tiny (what does swapping X for Y cost?).
COMPARISONS = {
    "models": ("vit_base_patch16_224", ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
                                        "vit_large_patch16_224", "vit_huge_patch14_224", "vit_22b", "swin_tiny",
                                        "hiera_tiny", "pvt_v2_b0"]),
    "tiny_variants": ("vit_tiny_patch16_224", ["vit_tiny_patch16_224", "vit_tiny_*", "pit_ti_like"]),
}


def compare(args: list[str]) -> int:
    """Compare the bundled recipes: tables on stdout, Markdown and PNG files in out/."""
    ensure_env(with_tests=False)
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    for label, (baseline, patterns) in COMPARISONS.items():
        recipes = []
        for pattern in patterns:
            for path in sorted((ROOT / "recipes").glob(f"{pattern}.yaml")):
                if str(path.relative_to(ROOT)) not in recipes:
                    recipes.append(str(path.relative_to(ROOT)))
        # --force: out/ holds this job's own generated results, refreshed on every run
        cmd = [BIN / "vitlab", "compare", *recipes, "--baseline", baseline, "--format", "md",
               "--output", out / f"{label}.md", "--plot", out / f"{label}.png", "--force", *args]
        print("+", " ".join(str(c) for c in cmd), flush=True)
        code = subprocess.call([str(c) for c in cmd], cwd=ROOT)
        if code:
            return code
    return 0


# One xdist worker per core, with worksteal: the suite mixes ~1500 tests of milliseconds with a few
# dozen of tens of seconds (zoo coverage, cost measurements, subprocesses), and an idle worker takes
# queued tests from a busy one instead of waiting on a fixed split by file (loadfile).
# Arguments given after the job come last, so ``-n 0`` or ``--dist loadfile`` override these.
XDIST = ["-n", "auto", "--dist", "worksteal"]


def test(args: list[str]) -> int:
    ensure_env(with_tests=True)
    cmd = [PY, "-m", "pytest", *XDIST, *args]
    print("+", " ".join(str(c) for c in cmd), flush=True)
    code = subprocess.call([str(c) for c in cmd], cwd=ROOT)
    return code


JOBS = {"compare": compare, "test": test}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in JOBS:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    sys.exit(JOBS[sys.argv[1]](sys.argv[2:]))
