"""Builds the optional C++ CPU kernels (kdfast._C) when torch and a compiler are present.

The package works without them: kdfast.backends() then reports why "cpp" is unavailable and the
dispatcher falls back to the reference backend on CPU tensors.
"""
import glob
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # torch absent at build time (isolated build): ship without the extension
    print("kdfast: torch not importable at build time; building without the C++ extension "
          "(install with --no-build-isolation to get it)", file=sys.stderr)
else:
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if sources:
        openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
        ext_modules.append(CppExtension(
            "kdfast._C", sources,
            extra_compile_args=["-O3", "-std=c++17", *openmp],
            extra_link_args=openmp,
            optional=True,  # a failed compile leaves a working pure-Python install
        ))
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
