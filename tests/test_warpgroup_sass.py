"""What ptxas made of the warpgroup (wgmma) kernels, read from their sm_90a SASS.

The warpgroup tile keeps a step's products running while the warps issue the
next copies and pass the next barrier (``wgmma.wait_group 1``). ptxas honours
that only when nothing else touches the accumulators between the products;
otherwise it quietly turns the wait into a full one (``WARPGROUP.DEPBAR.LE
gsb0, 0x0``) or serializes every product, and the results stay right: only
the SASS shows it. No GPU is needed: the kernels are compiled here with nvcc
for sm_90a and disassembled with cuobjdump. Skipped without nvcc or cuobjdump
(``make test`` installs cuobjdump and the nvdisasm it runs from PyPI).
"""

import collections
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The translation units holding warpgroup kernels, and how many kernels each
# must hold (so that a rename or a lost instantiation cannot empty the test).
WARPGROUP_UNITS = {"masked_matmul_gpu.cu": 58, "masked_conv2d_gpu.cu": 20}
# ptxas's "wgmma ... serialized" performance warnings (C7519, an injected
# warpgroup.arrive around a predicated product, costs an instruction, not the
# overlap).
SERIALIZED = re.compile(r"\(C75(1[0-8]|20)\)[^\n]*")
WAIT = re.compile(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x(\d)")


def find_nvcc():
    return shutil.which("nvcc") or next(
        (str(p) for p in [pathlib.Path("/usr/local/cuda/bin/nvcc")] if p.exists()), None)


def find_cuobjdump():
    """cuobjdump with nvdisasm beside it (it runs nvdisasm for -sass), or None."""
    wheels = pathlib.Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13" / "bin"
    for directory in [pathlib.Path(p).parent for p in (shutil.which("cuobjdump"),) if p] + [wheels]:
        if (directory / "cuobjdump").exists() and (directory / "nvdisasm").exists():
            return str(directory / "cuobjdump")
    return None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{unit: (ptxas output, {kernel: SASS lines})} for each warpgroup unit."""
    nvcc, cuobjdump = find_nvcc(), find_cuobjdump()
    if nvcc is None or cuobjdump is None:
        pytest.skip(f"needs nvcc, and cuobjdump with nvdisasm (nvcc: {nvcc}, cuobjdump: {cuobjdump})")
    out = tmp_path_factory.mktemp("sass")
    # The flags of CMakeLists.txt's sm_90a build of the kernels.
    builds = {
        unit: subprocess.Popen(
            [nvcc, "-DMASKED_OPS_SM90A_CODE=1", f"-I{ROOT}", "-O3", "-DNDEBUG", "-std=c++17", "-arch=sm_90a",
             "-cubin", "-o", str(out / f"{unit}.cubin"), str(ROOT / "cc/kernels/cuda" / unit)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for unit in WARPGROUP_UNITS
    }
    units = {}
    for unit, build in builds.items():
        log = build.communicate()[0]
        assert build.returncode == 0, log
        sass = subprocess.run([cuobjdump, "-sass", str(out / f"{unit}.cubin")], capture_output=True, text=True,
                              check=True).stdout
        kernels = collections.defaultdict(list)
        name = None
        for line in sass.splitlines():
            if "Function :" in line:
                name = line.split("Function :")[1].strip()
            elif name is not None:
                kernels[name].append(line)
        units[unit] = (log, kernels)
    return units


@pytest.mark.parametrize("unit", sorted(WARPGROUP_UNITS))
def test_no_product_is_serialized(compiled, unit):
    log, _ = compiled[unit]
    assert SERIALIZED.findall(log) == [], "\n".join(m.group(0) for m in SERIALIZED.finditer(log))


@pytest.mark.parametrize("unit", sorted(WARPGROUP_UNITS))
def test_each_step_waits_for_the_step_before_only(compiled, unit):
    _, kernels = compiled[unit]
    warpgroup = {name: lines for name, lines in kernels.items() if "Warpgroup" in name}
    assert len(warpgroup) == WARPGROUP_UNITS[unit]
    for name, lines in warpgroup.items():
        products = sum("HGMMA" in line for line in lines)
        waits = [int(m.group(1)) for line in lines for m in WAIT.finditer(line)]
        # One wait in the main loop that leaves the step's own products
        # running, and the full one after it, before the accumulators are read.
        assert products > 0 and waits == [1, 0], f"{name}: {products} HGMMA, waits {waits}"
