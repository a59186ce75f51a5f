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
    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """Leaves optional extensions out when they fail to compile: ninja reports a failed compile as a
        RuntimeError, which setuptools' `optional=True` does not catch."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if not ext.optional:
                    raise
                print(f"kdfast: building {ext.name} failed ({exc}); installing without it, the 'cpp' backend "
                      "is unavailable (kdfast.backends() says why)", file=sys.stderr)

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if sources:
        openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
        ext_modules.append(CppExtension(
            "kdfast._C", sources,
            # no -std: torch adds the standard its headers need (C++17 in older releases, C++20 in 2.14)
            # -fno-trapping-math lets the compiler evaluate both arms of a branch-free select (as in
            # `q > 0 ? q * (u - v) : 0`), which loops need to vectorise; the kernels never read FP exception flags
            extra_compile_args=["-O3", "-fno-trapping-math", *openmp],
            extra_link_args=openmp,
            optional=True,  # a failed compile leaves a working pure-Python install
        ))
        cmdclass["build_ext"] = OptionalBuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
