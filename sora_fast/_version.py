"""The package version: the one place it is written.

setup.py reads it (without importing the package) for the wheel's metadata, CMake reads it for
``sora_fast._C.__version__``, and :mod:`sora_fast._ext` compares the two to catch a stale build.
"""

__version__ = "0.1.0"
