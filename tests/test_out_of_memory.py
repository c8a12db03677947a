"""An allocation the machine refuses is reported as out of memory, however the allocator words it.

Under a process memory cap, with vitlab's guard lifted, ``build vit_22b --device cpu`` was an
"internal error"; torch's CPU allocator says "can't allocate memory", not CUDA's "out of memory".
"""
from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from vitlab.errors import is_out_of_memory

from conftest import subprocess_env


@pytest.mark.parametrize("message", [
    "CUDA out of memory. Tried to allocate 20.00 MiB",
    "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 4194304 bytes",
    "[Errno 12] Cannot allocate memory",
    "std::bad_alloc",
    "MPS backend out of memory",
])
def test_allocation_failures_in_every_wording(message):
    assert is_out_of_memory(RuntimeError(message)) and is_out_of_memory(message)


def test_other_errors_are_not_memory():
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert is_out_of_memory(MemoryError())


def _vm_peak_after_import() -> int:
    out = subprocess.run([sys.executable, "-c", "import vitlab, vitlab.cli, torch; "
                          "print(open('/proc/self/status').read().split('VmPeak:')[1].split()[0])"],
                         capture_output=True, text=True, env=subprocess_env(), timeout=120)
    return int(out.stdout.strip()) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_build_under_a_process_memory_cap_is_one_out_of_memory_line():
    cap = _vm_peak_after_import() + 600 * 2**20  # ViT-L's weights alone are 1.2 GB

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    res = subprocess.run([sys.executable, "-c", "from vitlab.cli import main; main()", "build", "vit_large_patch16_224",
                          "--device", "cpu"], capture_output=True, text=True, preexec_fn=limit, timeout=300,
                         env=subprocess_env(VITLAB_MAX_MEMORY="1000TiB"))  # the guard lifted
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: out of memory: ") and "internal error" not in lines[0]
