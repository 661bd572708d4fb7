"""scikit-build-core dynamic-metadata provider: pins the runtime TensorFlow.

The op library links against the TensorFlow it was built with, and TensorFlow
keeps no C++ ABI across minor versions, so the wheel requires that same
major.minor.
"""

from importlib.metadata import version


def tensorflow_requirement(tf_version: str) -> str:
    major, minor = (int(part) for part in tf_version.split(".")[:2])
    return f"tensorflow>={major}.{minor},<{major}.{minor + 1}"


def dynamic_metadata(settings, project):
    del settings, project
    return {"dependencies": [tensorflow_requirement(version("tensorflow"))]}


def get_requires_for_dynamic_metadata(settings):
    del settings
    return ["tensorflow>=2.21,<2.22"]
