"""Compile the KD loss kernels for a GPU target without a GPU, as the real launches see them, and print their
resource use.

    python -m bench.perf.kernel_resources [--arch 90] [--quick]

The launchers (`kd_loss_fwd`, `kd_loss_bwd`) are called on CPU tensors of each shape (allocated, never
touched) with every Triton kernel of `kdfast.losses.triton` intercepted at its launch: Triton's own binder
specialises the arguments for the target as a real launch would (argument types, 16-byte alignment of the
pointers, integers divisible by 16, the launcher's constexprs, warps and stages), then the kernel is compiled
through Triton's bundled ptxas and cuobjdump reads registers, stack (spills) and local memory from the cubin.
Catches compile errors on this machine and sizes the warp ladder: a variant with STACK > 0 spills registers.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from kdfast.losses import triton as kernels
from kdfast.losses.reference import SparseTeacher

from bench.perf.bench_kd_loss import launch_forward

# (N, C, dtype, return_stats): --quick is the one-tile and the tiled path at their widest tile, with stats
QUICK = [(64, 8000, torch.float32, True), (64, 32000, torch.float32, True), (64, 8000, torch.bfloat16, True),
         (64, 32000, torch.bfloat16, True)]
# (N, C, dtype, divergence code, sparse teacher): the reverse_kl / jsd and top-k variants (with stats), one-tile
# and tiled, in --quick too
DIVERGENCE_VARIANTS = [(64, 8000, torch.float32, 2, None), (64, 32000, torch.bfloat16, 1, None),
                       (64, 8000, torch.bfloat16, 2, "tail"), (64, 32000, torch.float32, 0, "renorm")]
TOPK = 64
FULL = [(N, C, dtype, stats) for N, C, dtype in ((256, 1000, torch.float32), (1024, 1000, torch.float32),
                                                  (8, 50257, torch.float32), (8, 50257, torch.bfloat16),
                                                  (4096, 32000, torch.bfloat16), (8192, 128256, torch.bfloat16))
        for stats in (False, True)]


def resources(compiled) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", out, re.S)
    shared = getattr(compiled.metadata, "shared", "?")
    return (f"REG={m.group(1):>3} STACK={m.group(2):>3} LOCAL={m.group(3)} SHARED={shared}" if m
            else out.strip())


def compile_launches(launch, target: GPUTarget) -> list[tuple[str, dict, object]]:
    """Run `launch()` with every Triton kernel of the module intercepted, and compile each launch it makes for
    `target` from the arguments it was given. Returns (kernel name, constexprs by name, compiled kernel)."""
    backend = make_backend(target)
    seen = []
    jitted = [v for v in vars(kernels).values() if isinstance(v, JITFunction)]

    def intercept(kernel):
        def run(*args, grid, warmup, **kwargs):
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
            names = {kernel.arg_names[path[0]]: value for path, value in constexprs.items()}
            seen.append((kernel.fn.__name__, names, compiled))
        return run

    for kernel in jitted:
        kernel.run = intercept(kernel)
    # the launcher's cache of compiled kernels asks the active (CUDA) driver for its device: the ordinary
    # launch, which the interception above sees, is the one to take here
    cache, kernels._compiled = kernels._compiled, None
    try:
        launch()
    except Exception:  # the launcher may use what a real launch returns; what it launched is compiled already
        if not seen:
            raise
    finally:
        kernels._compiled = cache
        for kernel in jitted:
            del kernel.run
    return seen


def _describe(name: str, constexprs: dict, compiled) -> str:
    flags = " ".join(f"{k}={v}" for k, v in constexprs.items() if not isinstance(v, bool) or v)
    return f"{name} warps={compiled.metadata.num_warps} stages={compiled.metadata.num_stages} {flags}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100")
    parser.add_argument("--quick", action="store_true", help="only the widest variants, with stats (the tests)")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    for N, C, dtype, stats in QUICK if args.quick else FULL:
        s, t = torch.empty(N, C, dtype=dtype), torch.empty(N, C, dtype=dtype)
        y = torch.randint(0, C, (N,))
        for name, constexprs, compiled in compile_launches(lambda: launch_forward(s, t, y, return_stats=stats),
                                                           target):
            print(f"fwd {str(dtype)[6:]:8} {N}x{C} {_describe(name, constexprs, compiled)} {resources(compiled)}")
    for N, C, dtype, divergence, sparse in DIVERGENCE_VARIANTS:
        s, y = torch.empty(N, C, dtype=dtype), torch.randint(0, C, (N,))
        t = (SparseTeacher(torch.zeros(N, TOPK, dtype=torch.int64), torch.zeros(N, TOPK), 1.0, sparse == "tail")
             if sparse else torch.empty(N, C, dtype=dtype))
        for name, constexprs, compiled in compile_launches(
                lambda: kernels.kd_loss_fwd(s, t, y, None, 0.5, 4.0, -100, 2, True, True, None, divergence), target):
            print(f"fwd {str(dtype)[6:]:8} {N}x{C} {_describe(name, constexprs, compiled)} {resources(compiled)}")
    # the backward's scaling kernel runs only when the upstream gradient is not a plain 1
    grad, grad_output = torch.empty(64, 32000, dtype=torch.bfloat16), torch.ones(64)
    for name, constexprs, compiled in compile_launches(lambda: kernels.kd_loss_bwd(grad, grad_output), target):
        print(f"bwd bfloat16 64x32000 {_describe(name, constexprs, compiled)} {resources(compiled)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
