"""The tensor copies (TMA) that stage the warpgroup kernels' operands, on
their own: one box per launch through the harness's probe
(cc/bindings/tensor_copy_probe.cuh), against the layout the CUDA emulation
lands and the kernels' descriptors read (tests/tensor_copy_model.py; the same
cases pass under the emulation in tests/test_cuda_emulated.py), so that a
failure here tells a tensor copy's fault from a product's;
bench/gpu_session.sh runs it before the warpgroup products, in a process
of its own. Skipped without a GPU of compute capability 9.0 or a harness
with the probe."""

import numpy as np
import pytest

from harness import for_tests
from tensor_copy_model import PROBE_CASES, describe_misplacement, landed_box, probe_array

torch, HARNESS = for_tests()
if torch.cuda.get_device_capability()[0] < 9:
    pytest.skip("tensor copies need compute capability 9.0", allow_module_level=True)
if not hasattr(HARNESS.library, "masked_ops_gpu_tensor_copy_probe"):
    pytest.skip("a harness built without the tensor-copy probe", allow_module_level=True)


@pytest.mark.parametrize("box_inner, box_outer, inner, outer, offset", PROBE_CASES)
def test_warpgroup_tensor_copy_lands_as_modelled(box_inner, box_outer, inner, outer, offset):
    array = probe_array(offset)
    rows, cols = array.shape
    # A CUDA allocation starts on 256 bytes; the array `offset` elements in.
    buffer = torch.from_numpy(np.ascontiguousarray(array).view(np.int16).reshape(-1)).cuda()
    padded = torch.zeros(rows * cols + offset, dtype=torch.int16, device="cuda")
    padded[offset:] = buffer
    status, completed, landed = HARNESS.tensor_copy_probe(padded[offset:].view(rows, cols), inner, outer, box_inner,
                                                          box_outer)
    assert status == 0, f"the probe's status {status} (-1: the driver refused the tensor map)"
    assert completed, "the mbarrier phase armed with the whole box's bytes never completed"
    expected = landed_box(array, inner, outer, box_inner, box_outer)
    assert np.array_equal(landed, expected), describe_misplacement(landed, expected, box_inner)
