"""Weight files are data: an ``.npz`` header with a negative dimension is refused from the header, and
torch's notes about old pickle protocols never reach the terminal as extra lines."""
from __future__ import annotations

import io
import warnings
import zipfile

import numpy as np
import pytest
import torch

from vitlab.errors import WeightsError
from vitlab.timm_interop.layouts import open_npz
from vitlab.timm_interop.sources import read_pickle

import vitlab
from conftest import TINY


def _npy_bytes(shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\x00" * 16  # the header (magic included) and 16 bytes of data


@pytest.mark.parametrize("shape", [(-1, 10**9), (10**5, -10**5), (-3,)])
def test_a_negative_dimension_is_refused_from_the_header(tmp_path, shape):
    path = tmp_path / "w.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("embedding/kernel.npy", _npy_bytes(shape))
    model = vitlab.build_model(vitlab.load_spec(TINY), seed=0)
    with pytest.raises(WeightsError, match="negative dimension"):
        open_npz(model, path)


def test_old_pickle_protocols_load_without_warnings(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=2, _use_new_zipfile_serialization=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning torch raises would fail here
        assert torch.equal(read_pickle(path)["w"], torch.ones(2))
