"""Compile the KD loss kernels for a GPU target without a GPU and print their resource use.

    python -m bench.kernel_resources [--arch 90] [--quick]

Triton compiles ahead of time through its bundled ptxas; cuobjdump reads registers, stack (spills) and
local memory from the cubin. Catches compile errors on this machine and sizes the warp ladder: a variant
with STACK > 0 spills registers.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kdfast.kernels import kd_loss as kernels

_FWD_CONSTEXPRS = ("HAS_TEACHER", "HAS_WEIGHT", "HAS_SCALE", "RETURN_GRAD", "RETURN_STATS", "SINGLE_TILE", "BLOCK_C",
                   "COUNT_VALID", "BLOCK_N", "REDUCE", "NUM_STAGES", "SPLIT")


def _fwd_signature(dtype: str) -> dict:
    sig = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "y_ptr": "*i64", "w_ptr": "*fp32", "scale_ptr": "*fp32",
           "rows_ptr": "*fp32", "loss_ptr": "*fp32", "count_ptr": "*i32",
           "part_ptr": "*fp32", "row_count_ptr": "*i32", "g_ptr": f"*{dtype}", "stats_ptr": "*fp32", "s_stride": "i64", "t_stride": "i64",
           "g_stride": "i64", "N": "i32", "C": "i32", "alpha": "fp32", "temperature": "fp32", "ignore_index": "i64"}
    return {**sig, **{name: "constexpr" for name in _FWD_CONSTEXPRS}}


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100")
    parser.add_argument("--quick", action="store_true", help="only the widest variants, with stats (the tests)")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    blocks = sorted({1024, kernels.TILE, kernels.MAX_SINGLE_TILE})
    for dtype in ("fp32", "bf16"):
        for single in (True, False):
            for block in blocks:
                if not single and block != kernels.TILE or single and block > kernels.MAX_SINGLE_TILE:
                    continue
                if args.quick and block < kernels.TILE:
                    continue
                for stats in (True,) if args.quick else (False, True):
                    warps = kernels._num_warps(block)
                    stages = 1 if single else kernels.NUM_STAGES
                    constexprs = dict(HAS_TEACHER=True, HAS_WEIGHT=True, HAS_SCALE=True, RETURN_GRAD=True,
                                      RETURN_STATS=stats, SINGLE_TILE=single, BLOCK_C=block, COUNT_VALID=False,
                                      BLOCK_N=1024, REDUCE=True, NUM_STAGES=stages, SPLIT=1)
                    compiled = triton.compile(ASTSource(kernels._kd_loss_fwd_kernel, _fwd_signature(dtype), constexprs),
                                              target=target, options={"num_warps": warps, "num_stages": stages})
                    path = "one-tile" if single else "tiled"
                    print(f"fwd {dtype:4} {path:8} BLOCK_C={block:<5} warps={warps:<2} stages={stages} stats={stats!s:5} "
                          f"{resources(compiled)}")
    sig = {"g_ptr": "*bf16", "go_ptr": "*fp32", "g_stride": "i64", "go_stride": "i64", "C": "i32", "n_tiles": "i32",
           "BLOCK_C": "constexpr"}
    block = kernels.BWD_BLOCK
    compiled = triton.compile(ASTSource(kernels._kd_loss_bwd_kernel, sig, {"BLOCK_C": block}), target=target,
                              options={"num_warps": kernels._num_warps(block)})
    print(f"bwd bf16 BLOCK_C={block} warps={kernels._num_warps(block)} {resources(compiled)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
