"""Where a tensor copy (TMA) lands a box in shared memory: the layout that
the CUDA emulation lands (tests/cuda_emulation) and that the warpgroup
kernels' descriptors read, for the tensor-copy probe's tests on the
emulation (tests/test_cuda_emulated.py) and on a GPU (tests/gpu)."""

import numpy as np

# (box_inner, box_outer, inner, outer, offset) on an array of
# PROBE_ARRAY_SHAPE starting `offset` elements past a 256-byte boundary:
# every swizzle (a box row of 32, 64, 128 bytes) with every box height the
# kernels ask for (8 to 128 rows), inside the array and over its last
# column, last row and corner (zeros there; the array's rows end where the
# swizzle moves chunks), and arrays only 16-byte aligned.
PROBE_ARRAY_SHAPE = (150, 200)
PROBE_CASES = ([(box_inner, box_outer, inner, outer, 0)
                for box_inner in (16, 32, 64)
                for box_outer in (8, 128)
                for inner, outer in ((8, 3), (200 - box_inner // 2, 5), (24, 150 - box_outer * 3 // 4),
                                     (200 - box_inner // 2, 150 - box_outer * 3 // 4))]
               + [(box_inner, box_outer, 8, 3, 0) for box_inner in (16, 32, 64) for box_outer in (16, 32, 64)]
               + [(box_inner, 32, 200 - box_inner // 2, 150 - 24, 8) for box_inner in (16, 32, 64)])


def probe_array(offset):
    """Distinct 16-bit values 1 .. (no 0: the zeros past the array's ends;
    no 0xffff: the probe's mark of shared memory that no copy wrote), as a
    view `offset` elements into a 256-byte aligned buffer."""
    rows, cols = PROBE_ARRAY_SHAPE
    buffer = np.empty(rows * cols + 128 + offset, np.uint16)
    start = (-buffer.ctypes.data % 256) // 2 + offset
    array = buffer[start:start + rows * cols].reshape(rows, cols)
    array[...] = (np.arange(rows * cols) % 65521 + 1).reshape(rows, cols)
    return array


def landed_box(array, inner, outer, box_inner, box_outer):
    """The 16-bit elements in shared memory (from a 1024-byte boundary, in
    address order) after a tensor copy of the box_outer x box_inner box at
    row `outer`, column `inner` of `array`: the box's rows one after another,
    box_inner * 2 bytes each, zeros where the box lies past the array, each
    16-byte chunk moved by the swizzle as wide as a row (32, 64 or 128
    bytes): its index XOR the address bits from 7 up, as many as a row has
    chunk-index bits."""
    rows, cols = array.shape
    box = np.zeros((box_outer, box_inner), np.uint16)
    r0, r1 = max(outer, 0), min(outer + box_outer, rows)
    c0, c1 = max(inner, 0), min(inner + box_inner, cols)
    if r0 < r1 and c0 < c1:
        box[r0 - outer:r1 - outer, c0 - inner:c1 - inner] = array[r0:r1, c0:c1]
    chunks = box.reshape(-1, 8)
    index = np.arange(len(chunks))
    landed = np.empty_like(chunks)
    landed[index ^ ((index >> 3) & (box_inner // 8 - 1))] = chunks
    return landed.reshape(-1)


def describe_misplacement(actual, expected, box_inner):
    """Where the first few landed elements differ from the model, as (row,
    element) of the box in address order, with what lies there and what
    should."""
    wrong = np.flatnonzero(actual != expected)
    places = [f"({i // box_inner}, {i % box_inner}): {actual[i]:#06x} for {expected[i]:#06x}" for i in wrong[:6]]
    return f"{len(wrong)} of {len(expected)} elements differ, first at " + ", ".join(places)
