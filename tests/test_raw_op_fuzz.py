"""The raw-op crash fuzzer's bounded pass, and regression tests for what it found.

Each regression test runs its calls in a child process, so that a crash that
comes back fails that test instead of ending the run.
"""

import os
import subprocess
import sys
import textwrap

import fuzz_raw_ops
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def run_isolated(code):
    """Runs `code` (after `import numpy as np, tensorflow as tf` and the raw
    ops as `ops`) in a fresh Python; returns its stdout, failing the test if
    the process did not exit cleanly."""
    preamble = textwrap.dedent(
        """
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import numpy as np
        import tensorflow as tf
        from masked_ops import _loader
        ops = _loader.op_library()
        """
    )
    done = subprocess.run([sys.executable, "-c", preamble + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"exit status {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.parametrize("seed", [11, 12])
def test_bounded_campaign_finds_nothing(seed, tmp_path):
    result = fuzz_raw_ops.campaign(1000, seed, str(tmp_path))
    assert not result["findings"], "\n\n".join(str(finding) for finding in result["findings"])
    outcomes = result["outcomes"]
    # The pass is not vacuous: it reaches the kernels with valid inputs
    # (checked against the reference) and with invalid ones (refused).
    assert outcomes.get("ok-checked", 0) > 100
    assert outcomes.get("InvalidArgumentError", 0) > 200


def test_campaign_reports_a_crashing_case_and_goes_on(tmp_path):
    # A stand-in for Python whose first child records a case and dies of a
    # segfault, the way a crashing op would; the second finishes normally.
    fake_python = tmp_path / "python"
    fake_python.write_text(textwrap.dedent(
        f"""\
        #!{sys.executable}
        import json, os, signal, sys
        sys.path.insert(0, {HERE!r})
        import fuzz_raw_ops
        seed, start, count = map(int, sys.argv[sys.argv.index("--child") + 1].split(":"))
        journal = sys.argv[sys.argv.index("--journal") + 1]
        with open(journal, "w") as log:
            log.write(json.dumps(fuzz_raw_ops.make_case(seed, start)) + "\\n")
        if start == 0:
            os.kill(os.getpid(), signal.SIGSEGV)
        print(json.dumps({{"outcomes": {{"ok": count}}, "findings": []}}))
        """
    ))
    fake_python.chmod(0o755)
    result = fuzz_raw_ops.campaign(3, 5, str(tmp_path), python=str(fake_python))
    assert [finding["case"] for finding in result["findings"]] == ["5:0"]
    # -11 (SIGSEGV), or 1 where AddressSanitizer catches the signal.
    assert result["findings"][0]["outcome"].startswith(("crash: exit status -11", "crash: exit status 1:"))
    assert result["outcomes"] == {"ran before a crash": 0, "crash": 1, "ok": 2}


def test_cases_are_reproducible_from_seed_and_index():
    assert fuzz_raw_ops.make_case(3, 17) == fuzz_raw_ops.make_case(3, 17)
    assert fuzz_raw_ops.make_case(3, 17) != fuzz_raw_ops.make_case(4, 17)


def test_outputs_too_large_for_int64_are_refused_naming_the_output():
    # Empty inputs may have huge dimensions; TensorShape's constructor
    # aborted the process on the output shape they imply.
    out = run_isolated(
        """
        cases = {
            "dw": lambda: ops.MaskedOps_MaskedMatmulGradWeight(
                x=tf.zeros([0, 2**40]), dy=tf.zeros([0, 2**40]), mask=tf.ones([1, 1]),
                block_rows=2**62, block_cols=2**62),
            "y": lambda: ops.MaskedOps_MaskedConv2D(
                x=tf.zeros([2**20, 2**20, 2**20, 0]), filters=tf.zeros([1, 1, 0, 8]), mask=tf.ones([0, 1]),
                output_mask=tf.zeros([0]), padding="VALID", in_channel_block=1, out_channel_block=8,
                tile_height=1, tile_width=1, use_output_mask=False),
        }
        for name, call in cases.items():
            try:
                call()
            except tf.errors.InvalidArgumentError as error:
                print(name, error.message)
        """
    )
    assert "dw would have shape [1099511627776, 1099511627776], more elements than a tensor can hold" in out
    assert "y would have shape [1048576, 1048576, 1048576, 8]" in out


def test_block_sizes_near_int64_max_act_as_the_whole_matrix():
    # ceil(k / block) overflowed for block sizes near 2^63: dw was left
    # unwritten and the mask grid was wrong.
    out = run_isolated(
        """
        rng = np.random.default_rng(0)
        x = tf.constant(rng.standard_normal([5, 13]), tf.float32)
        dy = tf.constant(rng.standard_normal([5, 30]), tf.float32)
        mask = tf.constant(rng.integers(0, 2, [13, 30]), tf.float32)
        huge = dict(block_rows=2**63 - 1, block_cols=2**63 - 1)
        whole = dict(block_rows=13, block_cols=30)
        for dtype in (tf.float32, tf.float16):
            a, b = tf.cast(x, dtype), tf.cast(dy, dtype)
            print(np.array_equal(ops.MaskedOps_MaskedMatmulGradWeight(x=a, dy=b, mask=mask, **huge),
                                 ops.MaskedOps_MaskedMatmulGradWeight(x=a, dy=b, mask=mask, **whole)))
            print(np.array_equal(ops.MaskedOps_MaskedMatmulGradWeight(x=a[:0], dy=b[:0], mask=mask, **huge),
                                 np.zeros([13, 30])))
        w = tf.constant(rng.standard_normal([13, 30]), tf.float32)
        print(np.allclose(ops.MaskedOps_MaskedMatmul(x=x, w=w, mask=tf.ones([1, 1]), **huge), x @ w, atol=1e-5))
        """
    )
    assert out.split() == ["True"] * 5


def test_conv_with_an_empty_channel_dimension_gives_zeros():
    # No input channels: the forward divided by the number of channel blocks
    # (SIGFPE). No output channels: dx must still be written.
    out = run_isolated(
        """
        no_output_mask = dict(output_mask=tf.zeros([0]), use_output_mask=False, in_channel_block=4,
                              out_channel_block=2, tile_height=4, tile_width=5)
        y = ops.MaskedOps_MaskedConv2D(x=tf.zeros([1, 1, 2, 0]), filters=tf.zeros([2, 2**31, 0, 5]),
                                       mask=tf.ones([0, 3]), strides=[2, 1], dilations=[2, 2], padding="SAME",
                                       **no_output_mask)
        print(y.shape, np.array_equal(y, np.zeros(y.shape)))
        x = tf.fill([1, 4, 4, 3], np.nan)
        dx = ops.MaskedOps_MaskedConv2DGradInput(x=x, filters=tf.zeros([3, 3, 3, 0]), mask=tf.ones([1, 0]),
                                                 dy=tf.zeros([1, 2, 2, 0]), padding="VALID", **no_output_mask)
        print(dx.shape, np.array_equal(dx, np.zeros(dx.shape)))
        """
    )
    assert out.splitlines() == ["(1, 1, 2, 5) True", "(1, 4, 4, 3) True"]
