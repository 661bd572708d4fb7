"""Crash fuzzer for the raw ops: random, mostly invalid inputs, checked answers.

Each case starts from a valid call of one raw op (shapes, block sizes,
strides, paddings, masks of every dtype, resource variables) and applies a few
mutations: a dimension set to 0 or to 2^31 / 2^40 / 2^62 (the tensor kept
empty so that it can exist), a rank changed, a dtype swapped, an attribute set
to 0, -1 or 2^63 - 1, a list attribute of the wrong length, an uninitialised
or mis-shaped variable, one variable passed twice. The call runs eagerly or in
a tf.function traced with unknown or with static shapes. An answer is either a
result or an error of an expected kind (InvalidArgumentError, TypeError, ...);
a result of a product op is compared with a float64 reference, so an invalid
input accepted silently is a finding too. A crash or a hang of the process is
found by running the cases in a child process, which records each case before
running it.

    python tests/fuzz_raw_ops.py --cases 100000 --seed 7    # a campaign
    python tests/fuzz_raw_ops.py --replay 7:4242            # one case, in-process

Cases are numbered (seed, index) and regenerated from that pair alone.
"""

import argparse
import faulthandler
import json
import os
import random
import resource
import subprocess
import sys
import time
import traceback

import numpy as np
from fuzz_references import ceil_div, conv_output_size

# Tensors a case builds stay below this many elements; larger shapes are made
# empty by a zero dimension.
MAX_ELEMENTS = 1 << 14
CHILD_ADDRESS_SPACE = 8 << 30
# A child's address space grows with every case (tf.function caches, thread
# stacks), and once it nears the cap any allocation can fail: TensorFlow and
# Python then dereference the null it returns. Children are replaced this often.
CASES_PER_CHILD = 1000
HUGE_DIMS = [2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**62]
ODD_INTS = [-(2**63), -(2**31), -1, 0, 1, 2, 3, 2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1]
FLOAT_TYPES = ["float32", "float64", "float16", "bfloat16"]
MASK_TYPES = ["bool", "int8", "uint8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"]
OTHER_TYPES = ["complex64", "uint16", "uint32", "string"]
MODES = ["eager", "eager", "graph_unknown", "graph_static"]

MATMUL_OPS = ["MaskedMatmul", "MaskedMatmulGradInput", "MaskedMatmulGradWeight"]
CONV_OPS = ["MaskedConv2D", "MaskedConv2DGradInput", "MaskedConv2DGradFilter"]
STEP_OPS = ["MaskedAdamStep", "MaskedSgdStep", "MaskedRmspropStep"]
ALL_OPS = MATMUL_OPS + CONV_OPS + ["MaskGradient", "MaskedUpdateVariable"] + STEP_OPS


# ---------------------------------------------------------------- generation


def _tensor(shape, dtype, fill="random"):
    return {"kind": "tensor", "shape": list(shape), "dtype": dtype, "fill": fill}


def _variable(shape, dtype):
    return {"kind": "variable", "shape": list(shape), "dtype": dtype, "initialized": True}


def _small_shape(rng, rank, high=5):
    return [rng.randint(0, high) for _ in range(rank)]


def _mask_input(rng, element_shape, grid_shape, dtype):
    return _tensor(element_shape if rng.random() < 0.5 else grid_shape, dtype, "mask")


def _matmul_case(rng, op):
    t = rng.choice(FLOAT_TYPES)
    leading = _small_shape(rng, rng.randint(0, 3))
    k, n = rng.randint(0, 40), rng.randint(0, 40)
    block_rows, block_cols = rng.randint(1, 9), rng.randint(1, 9)
    mask = _mask_input(rng, [k, n], [ceil_div(k, block_rows), ceil_div(n, block_cols)], rng.choice(MASK_TYPES))
    first, second = {
        "MaskedMatmul": (("x", leading + [k]), ("w", [k, n])),
        "MaskedMatmulGradInput": (("dy", leading + [n]), ("w", [k, n])),
        "MaskedMatmulGradWeight": (("x", leading + [k]), ("dy", leading + [n])),
    }[op]
    inputs = {first[0]: _tensor(first[1], t), second[0]: _tensor(second[1], t), "mask": mask}
    return inputs, {"block_rows": block_rows, "block_cols": block_cols}


def _conv_case(rng, op):
    t = rng.choice(FLOAT_TYPES)
    batch, height, width = rng.randint(0, 2), rng.randint(1, 9), rng.randint(1, 9)
    cin, cout = rng.randint(0, 6), rng.randint(0, 6)
    kh, kw = rng.randint(1, 3), rng.randint(1, 3)
    strides, dilations = [rng.randint(1, 3), rng.randint(1, 3)], [rng.randint(1, 2), rng.randint(1, 2)]
    padding = rng.choice(["SAME", "VALID", "EXPLICIT"])
    pads = [rng.randint(0, 3) for _ in range(4)] if padding == "EXPLICIT" else []
    in_block, out_block = rng.randint(1, 4), rng.randint(1, 4)
    out_h = conv_output_size(height, kh, strides[0], dilations[0], padding, *(pads[:2] or [0, 0]))
    out_w = conv_output_size(width, kw, strides[1], dilations[1], padding, *(pads[2:] or [0, 0]))
    out_h, out_w = out_h or 1, out_w or 1
    use_output_mask = rng.random() < 0.4
    output_mask_shape = [batch, out_h, out_w] + ([1] if rng.random() < 0.3 else []) if use_output_mask else [0]
    inputs = {
        "x": _tensor([batch, height, width, cin], t),
        "filters": _tensor([kh, kw, cin, cout], t),
        "mask": _mask_input(rng, [kh, kw, cin, cout], [ceil_div(cin, in_block), ceil_div(cout, out_block)],
                            rng.choice(MASK_TYPES)),
        "output_mask": _tensor(output_mask_shape, rng.choice(MASK_TYPES), "mask"),
    }
    if op != "MaskedConv2D":
        inputs["dy"] = _tensor([batch, out_h, out_w, cout], t)
    attrs = {
        "strides": strides, "dilations": dilations, "padding": padding, "explicit_paddings": pads,
        "in_channel_block": in_block, "out_channel_block": out_block,
        "tile_height": rng.randint(1, 5), "tile_width": rng.randint(1, 5), "use_output_mask": use_output_mask,
    }
    return inputs, attrs


STEP_SCALARS = {
    "MaskedAdamStep": ["alpha", "one_minus_beta_1", "one_minus_beta_2", "epsilon", "learning_rate", "weight_decay"],
    "MaskedSgdStep": ["learning_rate", "momentum_factor", "weight_decay"],
    "MaskedRmspropStep": ["learning_rate", "rho", "one_minus_rho", "momentum_factor", "epsilon", "weight_decay"],
}
STEP_VARIABLES = {
    "MaskedAdamStep": ["variable", "m", "v", "v_hat"],
    "MaskedSgdStep": ["variable", "momentum"],
    "MaskedRmspropStep": ["variable", "velocity", "momentum", "average_grad"],
}
STEP_FLAGS = {
    "MaskedAdamStep": ["amsgrad"],
    "MaskedSgdStep": ["use_momentum", "nesterov"],
    "MaskedRmspropStep": ["use_momentum", "centered"],
}


def _elementwise_case(rng, op):
    t = rng.choice(FLOAT_TYPES)
    shape = _small_shape(rng, rng.randint(1, 4), high=9)
    block_rows, block_cols = rng.randint(1, 5), rng.randint(1, 5)
    k, n = (shape[-2] if len(shape) >= 2 else 1), shape[-1]
    mask = _mask_input(rng, shape, [ceil_div(k, block_rows), ceil_div(n, block_cols)], rng.choice(MASK_TYPES))
    attrs = {"block_rows": block_rows, "block_cols": block_cols}
    if op == "MaskGradient":
        return {"grad": _tensor(shape, t), "mask": mask}, attrs
    if op == "MaskedUpdateVariable":
        attrs["mode"] = rng.choice(["assign", "add", "sub"])
        return {"resource": _variable(shape, t), "value": _tensor(shape, t), "mask": mask}, attrs
    inputs = {name: _variable(shape, t) for name in STEP_VARIABLES[op]}
    inputs["grad"] = _tensor(shape, t)
    inputs["mask"] = mask
    for name in STEP_SCALARS[op]:
        inputs[name] = _tensor([], t, "scalar")
    attrs.update({flag: rng.random() < 0.5 for flag in STEP_FLAGS[op]})
    return inputs, attrs


def _elements(shape):
    total = 1
    for dim in shape:
        total *= dim
    return total


def _fit(rng, shape):
    """Keeps a tensor buildable: too many elements and a dimension becomes 0,
    early enough that no prefix product overflows int64 (TensorFlow refuses
    such a shape)."""
    if _elements(shape) > MAX_ELEMENTS:
        small = [d for d, size in enumerate(shape) if size < 2**20]
        shape[rng.choice(small) if small else rng.randrange(len(shape))] = 0
    product = 1
    for d, size in enumerate(shape):
        if product * size >= 2**63:
            shape[d] = 0
        product *= shape[d]
    return shape


def _mutate(rng, inputs, attrs):
    tensors = [spec for spec in inputs.values() if spec["kind"] in ("tensor", "variable")]
    spec = rng.choice(tensors)
    choice = rng.randrange(10)
    if choice <= 2 and spec["shape"]:
        shape = spec["shape"]
        shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 7, 33] + HUGE_DIMS)
        spec["shape"] = _fit(rng, shape)
    elif choice == 3:
        shape = spec["shape"]
        if shape and rng.random() < 0.5:
            del shape[rng.randrange(len(shape))]
        elif len(shape) < 6:
            shape.insert(rng.randint(0, len(shape)), rng.choice([0, 1, 2, 3]))
        spec["shape"] = _fit(rng, shape)
    elif choice == 4:
        spec["dtype"] = rng.choice(FLOAT_TYPES + MASK_TYPES + OTHER_TYPES)
    elif choice == 5 and attrs:
        name = rng.choice(sorted(attrs))
        value = attrs[name]
        if isinstance(value, bool):
            attrs[name] = not value
        elif isinstance(value, int):
            attrs[name] = rng.choice(ODD_INTS)
        elif isinstance(value, list):
            attrs[name] = [rng.choice(ODD_INTS + [1, 2]) for _ in range(rng.choice([0, 1, 2, 2, 3, 4, 5]))]
        else:
            attrs[name] = rng.choice(["SAME", "VALID", "EXPLICIT", "FULL", "", "assign", "add", "sub", "mul"])
    elif choice == 6:
        spec["fill"] = rng.choice(["nan", "inf", "huge"]) if spec["kind"] == "tensor" else spec.get("fill")
    elif choice == 7 and spec["kind"] == "variable":
        variables = [name for name, other in inputs.items() if other["kind"] == "variable"]
        action = rng.choice(["uninitialized", "alias", "tensor"])
        if action == "uninitialized":
            spec["initialized"] = False
        elif action == "alias" and len(variables) > 1:
            spec["alias"] = rng.choice([name for name in variables if inputs[name] is not spec])
        else:
            spec["kind"] = "tensor"
    else:
        # Every tensor input huge but empty: outputs whose sizes multiply out
        # past int64.
        for spec in tensors:
            if spec["shape"]:
                spec["shape"] = [rng.choice(HUGE_DIMS) for _ in spec["shape"]]
                spec["shape"][rng.randrange(len(spec["shape"]))] = 0
                _fit(rng, spec["shape"])


def make_case(seed, index):
    rng = random.Random(seed * 1_000_003 + index)
    op = ALL_OPS[index % len(ALL_OPS)]
    if op in MATMUL_OPS:
        inputs, attrs = _matmul_case(rng, op)
    elif op in CONV_OPS:
        inputs, attrs = _conv_case(rng, op)
    else:
        inputs, attrs = _elementwise_case(rng, op)
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3])):
        _mutate(rng, inputs, attrs)
    return {"seed": seed, "index": index, "op": op, "mode": rng.choice(MODES), "inputs": inputs, "attrs": attrs,
            "data_seed": rng.randrange(2**31)}


# ------------------------------------------------------------------ running


def _build_tensor(tf, spec, np_rng):
    shape, dtype, fill = spec["shape"], spec["dtype"], spec.get("fill", "random")
    if dtype == "string":
        return tf.fill(shape, "s")
    count = _elements(shape)
    if count == 0:
        return tf.zeros(shape, dtype)
    if fill == "mask":
        values = np_rng.choice([0.0, 0.0, 1.0, 0.5, -2.0], size=count)
    elif fill == "scalar":
        values = np_rng.uniform(0.05, 0.9, size=count)
    else:
        values = np_rng.standard_normal(count)
    if fill in ("nan", "inf") and count:
        values[np_rng.integers(0, count, size=max(1, count // 4))] = np.nan if fill == "nan" else np.inf
    if fill == "huge":
        values *= 1e300
    if dtype == "bool":
        return tf.constant((values != 0).reshape(shape))
    if dtype in ("float32", "float64", "float16", "bfloat16", "complex64"):
        return tf.cast(tf.constant(values.reshape(shape), tf.float64), dtype)
    return tf.cast(tf.constant(np.clip(values, -2, 2).astype(np.int64).reshape(shape)), dtype)


def _build_inputs(tf, case):
    np_rng = np.random.default_rng(case["data_seed"])
    built, variables = {}, {}
    for name, spec in case["inputs"].items():
        if spec["kind"] == "tensor":
            built[name] = _build_tensor(tf, spec, np_rng)
        elif "alias" not in spec:
            if spec["initialized"]:
                variables[name] = tf.Variable(_build_tensor(tf, spec, np_rng))
            else:
                dtype = tf.string if spec["dtype"] == "string" else tf.as_dtype(spec["dtype"])
                variables[name] = tf.raw_ops.VarHandleOp(dtype=dtype, shape=spec["shape"], shared_name=f"fuzz{id(spec)}")
    for name, spec in case["inputs"].items():
        if spec["kind"] == "variable":
            variable = variables[spec.get("alias", name)]
            built[name] = variable.handle if hasattr(variable, "handle") else variable
    return built, variables


def _call(tf, op_function, case, built):
    attrs = case["attrs"]
    if case["mode"] == "eager":
        return op_function(**built, **attrs)
    names = sorted(name for name in built if built[name].dtype != tf.resource)
    captured = {name: value for name, value in built.items() if name not in names}

    def body(*args):
        return op_function(**dict(zip(names, args)), **captured, **attrs)

    static = case["mode"] == "graph_static"
    signature = [tf.TensorSpec(built[name].shape if static else None, built[name].dtype) for name in names]
    return tf.function(body, input_signature=signature, autograph=False)(*[built[name] for name in names])


def expected_errors(tf):
    """What an op may answer instead of a result.

    NotFoundError: no kernel for a dtype combination; FailedPrecondition: an
    uninitialised variable; TypeError / ValueError: the Python op builder's own
    checks; ResourceExhausted: an output too large to allocate.
    """
    return (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.FailedPreconditionError,
            tf.errors.ResourceExhaustedError, TypeError, ValueError)


def run_case(case):
    """The outcome of one case: "ok", "ok-checked", an expected error's name,
    or "finding: ..." for a wrong result or an unexpected error."""
    import tensorflow as tf

    from masked_ops import _loader

    op_function = getattr(_loader.op_library(), f"MaskedOps_{case['op']}")
    try:
        built, _ = _build_inputs(tf, case)
    except Exception as error:  # an input the fuzzer itself cannot build
        return f"skip: {type(error).__name__}: {str(error)[:80]}"
    try:
        result = _call(tf, op_function, case, built)
    except expected_errors(tf) as error:
        return type(error).__name__
    except Exception as error:  # anything else is a finding, reported with its message
        return f"finding: unexpected {type(error).__name__}: {str(error)[:300]}"
    try:
        from fuzz_references import check_result

        return check_result(tf, case, built, result)
    except Exception:
        return "finding: the result check failed:\n" + traceback.format_exc()[-600:]


def _child(seed, start, count, journal):
    """Runs cases start..start+count-1, writing each to the journal first."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # A crash then reports the Python stack too, in the stderr the campaign keeps.
    faulthandler.enable()
    # NaN and Inf are what many cases are made of: keep them out of that stderr.
    np.seterr(all="ignore")
    # An allocation the machine cannot back fails inside the process (an
    # error to check) instead of calling in the kernel's OOM killer. Under
    # AddressSanitizer, whose shadow memory needs terabytes of address space,
    # its own allocation limit does this (make sanitize sets it).
    if "ASAN_OPTIONS" not in os.environ:
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # every graph case traces a new function
    outcomes = {}
    findings = []
    with open(journal, "w") as log:
        for index in range(start, start + count):
            case = make_case(seed, index)
            log.write(json.dumps(case) + "\n")
            log.flush()
            outcome = run_case(case)
            if outcome.startswith("finding"):
                findings.append({"case": f"{seed}:{index}", "op": case["op"], "outcome": outcome})
                outcome = "finding"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(json.dumps({"outcomes": outcomes, "findings": findings}))


def campaign(cases, seed, journal_dir, case_timeout=60.0, python=sys.executable, env=None):
    """Runs cases 0..cases-1 of `seed` in child processes of CASES_PER_CHILD
    cases each; a child that dies or hangs is a finding (its last journal
    line is the case) and the campaign goes on from the next case. Returns {"outcomes": {...}, "findings": [...]}."""
    outcomes, findings = {}, []
    start = 0
    os.makedirs(journal_dir, exist_ok=True)
    journal = os.path.join(journal_dir, f"fuzz-{seed}.jsonl")
    while start < cases:
        batch = min(cases - start, CASES_PER_CHILD)
        command = [python, os.path.abspath(__file__), "--child", f"{seed}:{start}:{batch}", "--journal", journal]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=case_timeout * batch / 20 + 120,
                                  env=env)
            died = done.returncode != 0
            detail = f"exit status {done.returncode}: {done.stderr[-1500:]}"
        except subprocess.TimeoutExpired as timeout:
            died = True
            detail = f"timed out (hang?): {(timeout.stderr or b'')[-500:]!r}"
        if not died:
            summary = json.loads(done.stdout.strip().splitlines()[-1])
            for outcome, count in summary["outcomes"].items():
                outcomes[outcome] = outcomes.get(outcome, 0) + count
            findings.extend(summary["findings"])
            start += batch
            continue
        with open(journal) as log:
            lines = log.read().splitlines()
        last = json.loads(lines[-1])
        ran = last["index"] - start
        outcomes["ran before a crash"] = outcomes.get("ran before a crash", 0) + ran
        outcomes["crash"] = outcomes.get("crash", 0) + 1
        findings.append({"case": f"{seed}:{last['index']}", "op": last["op"], "outcome": "crash: " + detail,
                         "input": last})
        start = last["index"] + 1
    return {"outcomes": outcomes, "findings": findings}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    # Under the repository's build/ (ignored by git), wherever it is run from.
    parser.add_argument("--journal-dir", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "build", "fuzz"))
    parser.add_argument("--replay", help="SEED:INDEX: print the case and run it in this process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--journal", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        seed, start, count = (int(part) for part in args.child.split(":"))
        _child(seed, start, count, args.journal)
        return 0
    if args.replay:
        seed, index = (int(part) for part in args.replay.split(":"))
        case = make_case(seed, index)
        print(json.dumps(case, indent=1))
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        print(run_case(case))
        return 0
    began = time.time()
    result = campaign(args.cases, args.seed, args.journal_dir)
    print(json.dumps({"seed": args.seed, "cases": args.cases, "seconds": round(time.time() - began),
                      **result}, indent=1))
    return 1 if result["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
