"""The installed package: version pin, library loading, import errors."""

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

import masked_ops
from masked_ops import _build_info, _loader


def run_python(code, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_built_against_the_running_tensorflow():
    assert _build_info.TENSORFLOW_VERSION == tf.__version__


def test_runtime_requirement_pins_the_built_minor_version():
    major, minor = (int(v) for v in _build_info.TENSORFLOW_VERSION.split(".")[:2])
    requirements = importlib.metadata.requires("tf-masked-ops")
    tensorflow_pins = [r for r in requirements if r.startswith("tensorflow")]
    assert len(tensorflow_pins) == 1
    specifiers = set(tensorflow_pins[0][len("tensorflow"):].replace(" ", "").split(","))
    assert specifiers == {f">={major}.{minor}", f"<{major}.{minor + 1}"}


@pytest.mark.parametrize("running", ["2.21.0", "2.21.7", "2.21.0rc1"])
def test_same_minor_version_is_accepted(running):
    _loader.check_tensorflow_version(running, "2.21.0")


@pytest.mark.parametrize("running", ["2.20.0", "2.22.0", "3.21.0"])
def test_other_minor_version_raises_import_error_naming_both(running):
    with pytest.raises(ImportError) as err:
        _loader.check_tensorflow_version(running, "2.21.0")
    assert running in str(err.value) and "2.21.0" in str(err.value)


def test_import_under_another_tensorflow_fails_cleanly(tmp_path):
    result = run_python(
        """
        import tensorflow as tf
        tf.__version__ = "2.99.0"
        try:
            import masked_ops
        except ImportError as err:
            print("ImportError:", err)
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "2.99.0" in result.stdout and _build_info.TENSORFLOW_VERSION in result.stdout


def test_library_loads_from_the_package_from_any_working_directory(tmp_path):
    result = run_python(
        """
        import masked_ops, tensorflow as tf
        print(masked_ops.masked_matmul(tf.ones((1, 2)), tf.ones((2, 3)), tf.ones((1, 1))).numpy().tolist())
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[[2.0, 2.0, 2.0]]"
    library = os.path.join(os.path.dirname(masked_ops.__file__), "_masked_ops.so")
    assert os.path.isfile(library)


def test_library_is_loaded_once():
    assert _loader.op_library() is _loader.op_library()
