"""Registers and spills of the fused attention JVP kernel per block configuration, without a GPU.

`python -m scripts.attention_registers [--arch 90] [--head-dim 128] [--dtype bf16] [--no-kv-tangent]
[--hopper]` compiles `ops.attention.kernel._attention_fwd_jvp_kernel` (with --hopper: the Gluon kernel
of `ops.attention.hopper`, sm_90 only) for the target architecture with Triton's own toolchain (no
device is needed) and prints ptxas's register count, spill bytes and shared memory per configuration,
and whether ptxas serialised the warpgroup MMAs for want of registers (its warning C7512). The kernel
is specialised as the op calls it in the models: 16-byte aligned pointers and strides, a unit head-dim
stride. Register pressure is what bounds this kernel's tile
sizes (docs/benchmarks.md, Attention); use this between GPU runs to see whether a change to the
kernel frees registers. The numbers match the GPU machine only for the same Triton version.
"""

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ops.attention import kernel

DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
CONFIGS = [*kernel.TUNING_SPACE, kernel.FALLBACK_CONFIG, (128, 128, 8, 2)]


def kernel_source(head_dim: int, dtype: str, kv_tangent: bool, block_m: int, block_n: int) -> ASTSource:
    """The kernel with the types and specialisations the op's launches give it."""
    fn = kernel._attention_fwd_jvp_kernel
    names = fn.arg_names
    signature = {}
    for name in names:
        if name in ("Q", "K", "V", "TQ", "TK", "TV", "O", "TO"):
            signature[name] = f"*{dtype}"
        elif name == "LSE":
            signature[name] = "*fp32"
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    constants = dict(
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PRECISION="ieee" if dtype == "fp32" else "tf32",
        KV_TANGENT=kv_tangent,
    )
    constants.update({name: 1 for name in names if name.startswith("stride") and name.endswith("d")})
    for name in constants:
        signature[name] = "constexpr"
    aligned = [n for n in names if signature[n].startswith("*") or (n.startswith("stride") and n not in constants)]
    return ASTSource(
        fn,
        signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )


def ptxas_report(ptx: str, arch: int) -> dict:
    """Run Triton's ptxas with -v on the PTX; registers, spill bytes (stores, loads), stack frame."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run(
            [ptxas, f"-arch=sm_{arch}a", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True,
            text=True,
        )
    if run.returncode:
        raise RuntimeError(f"ptxas failed: {run.stderr.strip()}")
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, run.stderr)) else 0
    return dict(
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack=number(r"(\d+) bytes stack frame"),
        wgmma_serialised="C7512" in run.stderr,
    )


def hopper_source(head_dim: int, dtype: str, kv_tangent: bool, config):
    """The Hopper kernel with the descriptors and constants its launches give it."""
    import torch
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from ops.attention import hopper

    block_n, consumer_regs, loader_regs, pingpong = config
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    x = torch.empty(2, 256, 4, head_dim, dtype=torch_dtype)  # only its dtype and strides matter
    descs = [hopper._descriptor(x, hopper.ROWS)] * 2 + [hopper._descriptor(x, block_n)] * 4
    fn = hopper._fwd_jvp_hopper_kernel
    names = fn.arg_names
    signature = {name: mangle_type(desc) for name, desc in zip(names[: len(descs)], descs, strict=True)}
    signature.update(O=f"*{dtype}", TO=f"*{dtype}", LSE="*fp32", scale="fp32")
    signature.update({name: "i32" for name in ("num_heads", "seq_q", "seq_kv")})
    constants = dict(
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        NUM_STAGES=hopper.NUM_STAGES,
        KV_TANGENT=kv_tangent,
        PINGPONG=pingpong,
        CONSUMER_REGS=consumer_regs,
        LOADER_REGS=loader_regs,
    )
    signature.update({name: "constexpr" for name in constants})
    return GluonASTSource(
        fn,
        {name: signature[name] for name in names},
        constexprs={(names.index(k),): v for k, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in ("O", "TO", "LSE")},
    )


def hopper_main(args):
    from ops.attention import hopper

    print("| BLOCK_N | consumer regs | producer regs | ping-pong | spill stores B | wgmma serialised | shared KiB |")
    print("|---|---|---|---|---|---|---|")
    default = hopper.CONFIGS[args.head_dim]
    for config in [default, (default[0], *default[1:3], not default[3]), (32, *default[1:])]:
        src = hopper_source(args.head_dim, DTYPES[args.dtype], not args.no_kv_tangent, config)
        compiled = triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options=dict(num_warps=4))
        report = ptxas_report(compiled.asm["ptx"], args.arch)
        cells = [*config, report["spill_stores"], report["wgmma_serialised"], compiled.metadata.shared // 1024]
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for Hopper")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--no-kv-tangent", action="store_true", help="the four-matmul variant")
    parser.add_argument("--hopper", action="store_true", help="the Gluon kernel (bf16/fp16, D 64/128)")
    args = parser.parse_args()
    print(
        f"triton {triton.__version__}, sm_{args.arch}a, head dim {args.head_dim}, {args.dtype}, "
        f"K/V tangent {not args.no_kv_tangent}"
    )
    if args.hopper:
        hopper_main(args)
        return
    columns = "BLOCK_M | BLOCK_N | warps | stages | registers | spill stores B | spill loads B | wgmma serialised"
    print(f"| {columns} | shared KiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for block_m, block_n, warps, stages in CONFIGS:
        src = kernel_source(args.head_dim, DTYPES[args.dtype], not args.no_kv_tangent, block_m, block_n)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", args.arch, 32), options=dict(num_warps=warps, num_stages=stages)
        )
        report = ptxas_report(compiled.asm["ptx"], args.arch)
        cells = [
            block_m,
            block_n,
            warps,
            stages,
            report["registers"],
            report["spill_stores"],
            report["spill_loads"],
            report["wgmma_serialised"],
            compiled.metadata.shared // 1024,
        ]
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
