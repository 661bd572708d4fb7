"""Prints, as JSON, how to compile and link against the installed TensorFlow.

Run once by CMake at configure time.
"""

import json
import re

import tensorflow as tf

compile_flags = tf.sysconfig.get_compile_flags()
abi = next(
    (m.group(1) for m in map(re.compile(r"-D_GLIBCXX_USE_CXX11_ABI=(\d)").fullmatch, compile_flags) if m),
    None,
)
if abi is None:
    raise SystemExit("tf.sysconfig.get_compile_flags() names no _GLIBCXX_USE_CXX11_ABI: " + " ".join(compile_flags))

print(
    json.dumps(
        {
            "version": tf.__version__,
            "cxx11_abi": abi,
            # The ABI define is applied separately, to every target.
            "compile_flags": ";".join(f for f in compile_flags if not f.startswith("-D_GLIBCXX_USE_CXX11_ABI")),
            "link_flags": ";".join(tf.sysconfig.get_link_flags()),
            # The wheel ships the CUDA headers TensorFlow was built with, for GPU glue.
            "include_dir": tf.sysconfig.get_include(),
        }
    )
)
