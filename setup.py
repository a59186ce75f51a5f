"""Builds the C++ CPU kernels (kdfast._C) at install when torch and a compiler are present, and ships their sources
(csrc/ as kdfast/csrc/) in every wheel.

An isolated build (plain `pip install`, `python -m build`) has no torch, so it installs without kdfast._C; the first
process that wants the C++ backend then compiles the shipped sources once per machine (kdfast/runtime/cpp_build.py).
`pip install --no-build-isolation` compiles them here instead. A failed compile leaves a working install:
kdfast.backends() says why "cpp" is unavailable and the dispatcher falls back to the reference backend.
"""
import glob
import importlib.util
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

# The compile flags, shared with the first-use compile: cpp_build.py imports only the standard library at its top,
# so it loads here without torch (and without importing the package).
_spec = importlib.util.spec_from_file_location("_kdfast_cpp_build", os.path.join("kdfast", "runtime", "cpp_build.py"))
cpp_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpp_build)

SOURCES = cpp_build.source_files("csrc")
HEADERS = sorted(glob.glob(os.path.join("csrc", "*.h")))


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package as kdfast/csrc/, where the first-use compile finds it."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "kdfast", "csrc")
        self.mkpath(target)
        for path in SOURCES + HEADERS:
            self.copy_file(path, os.path.join(target, os.path.basename(path)))


ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # torch absent at build time (isolated build): ship the sources, compiled on first use
    print("kdfast: torch not importable at build time; building without kdfast._C (the C++ kernels compile on "
          "first use, once per machine)", file=sys.stderr)
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

    if SOURCES:
        ext_modules.append(CppExtension(
            "kdfast._C", SOURCES,
            extra_compile_args=cpp_build.EXTRA_COMPILE_ARGS,
            extra_link_args=cpp_build.EXTRA_LINK_ARGS,
            optional=True,  # a failed compile leaves a working pure-Python install
        ))
        cmdclass["build_ext"] = OptionalBuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
