"""Compile every Triton kernel launch for sm_80 (A100) and sm_90 (H100) on this CPU machine.

For every launch that the loss wrappers plan at the recipe shapes (7B stage 1: 32 anchors per
rank against 256 + 256 candidates; B = 256 against 16,384 candidates; Pearson: 30 pairs per rank
and 1M pairs; D = 4,096), in fp32, bf16 and fp16, records registers per thread, spills (stack),
shared memory per program against the target's limit, whether the matrix products became
tensor-core instructions, and the programs per launch against 2 × an H100's 132 SMs.

Usage:
    python benchmarks/kernel_resources.py            # full matrix -> results/kernel_resources.json
    python benchmarks/kernel_resources.py --quick    # bf16 + fp32 only (what `make test` runs)

Exit status 1 when a launch fails to compile, spills, exceeds shared memory, a 16-bit InfoNCE
product misses the tensor cores, an InfoNCE launch has fewer programs than the target, or a
``@triton.jit`` kernel of ours is never compiled. Needs no GPU; must run without
``TRITON_INTERPRET`` (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_facts, write_result  # noqa: E402

# Matrix products that must run on tensor cores for 16-bit inputs.
TENSOR_CORE_KERNELS = {"_dot_partial_kernel", "_infonce_fwd_kernel", "_grad_logits_kernel",
                       "_scaled_matmul_kernel"}


def defined_kernels() -> set[str]:
    """Names of every ``@triton.jit`` kernel (``_*_kernel``; the others are device helpers) in
    our kernel modules."""
    from triton.runtime.jit import JITFunction

    import pcc_dist.kernels.infonce_jit as infonce
    import pcc_dist.kernels.pearson as pearson

    return {name for module in (infonce, pearson) for name, obj in vars(module).items()
            if isinstance(obj, JITFunction) and name.endswith("_kernel")}


def run(dtype_names: list[str]) -> dict:
    from pcc_dist.kernels.launch import H100_SMS, PROGRAMS_PER_SM
    from pcc_dist.kernels.resources import ARCHS, DTYPES, compile_launch, distinct, recipe_launches

    target = PROGRAMS_PER_SM * H100_SMS
    rows, failures, compiled_kernels = [], [], set()
    for dtype_name in dtype_names:
        launches = recipe_launches(DTYPES[dtype_name])
        for name, launch in launches.items():
            if name.startswith("infonce_") and launch.programs < target:
                failures.append(f"{dtype_name} {name}: {launch.programs} programs < {target}")
        for name, launch in distinct(launches).values():
            for arch in ARCHS:
                try:
                    res = compile_launch(launch, arch, dtype_name)
                except Exception as err:  # a compile error of any kind is a finding, not a crash
                    failures.append(f"{dtype_name} {arch} {name}: does not compile: {err}")
                    continue
                compiled_kernels.add(res.kernel)
                row = {"launch": name, **res.as_dict()}
                rows.append(row)
                failures += [f"{dtype_name} {arch} {name}: {p}" for p in res.problems]
                if (dtype_name != "fp32" and res.kernel in TENSOR_CORE_KERNELS
                        and res.tensor_core == "none"):
                    failures.append(f"{dtype_name} {arch} {name}: no tensor-core instructions")
                print(f"{arch} {dtype_name:4s} {name:42s} {res.kernel:24s} reg {res.registers:3d} "
                      f"spill {res.spill_bytes:3d} smem {res.shared_bytes:6d} "
                      f"tc {res.tensor_core:5s} programs {res.programs}", flush=True)
    missing = sorted(defined_kernels() - compiled_kernels)
    if missing:
        failures.append(f"kernels never compiled: {missing}")
    return {"rows": rows, "failures": failures, "target_programs": target,
            "kernels": sorted(compiled_kernels)}


def markdown_table(rows: list[dict]) -> str:
    """One line per kernel and arch: worst registers/spills/shared memory over its launches."""
    worst: dict[tuple[str, str], dict] = {}
    for row in rows:
        key = (row["kernel"], row["arch"])
        entry = worst.setdefault(key, {"registers": 0, "spill": 0, "shared": 0, "tc": set(),
                                       "programs": []})
        entry["registers"] = max(entry["registers"], row["registers"])
        entry["spill"] = max(entry["spill"], row["spill_bytes"])
        entry["shared"] = max(entry["shared"], row["shared_bytes"])
        entry["tc"].add(f"{row['dtype']}:{row['tensor_core']}")
        entry["programs"].append(row["programs"])
    lines = ["| kernel | arch | max registers | spills (B) | max shared (KiB) | dot instructions "
             "by dtype | programs (min–max) |", "|---|---|---:|---:|---:|---|---|"]
    for (kernel, arch), e in sorted(worst.items()):
        lines.append(f"| `{kernel}` | {arch} | {e['registers']} | {e['spill']} | "
                     f"{e['shared'] / 1024:.1f} | {', '.join(sorted(e['tc']))} | "
                     f"{min(e['programs'])}–{max(e['programs'])} |")
    return "\n".join(lines)


# H100 SXM datasheet peaks (dense): what the roofline below divides by. Measured here on one H100
# (device KINDS.md): 798 TFLOP/s bf16 GEMM and ~3.0 TB/s copies, i.e. 80-90 % of these.
H100 = {"bf16_flops": 989e12, "tf32_flops": 495e12, "fp32_flops": 67e12, "hbm_bytes": 3.35e12}


def _pass_us(flops: float, bytes_moved: float, peak: str) -> float:
    """Roofline time of one pass in µs: the larger of compute and memory time."""
    return 1e6 * max(flops / H100[peak], bytes_moved / H100["hbm_bytes"])


def roofline(rows: int, blocks: list[int], dim: int, chunk: int = 2048) -> dict:
    """Computed (not measured) forward + backward time of InfoNCE in bf16 on one H100.

    Triton (the fused mode's passes): norms; forward 2BMD on bf16 tensor cores reading A and C;
    G kernel 2BMD again, writing G (4BM bytes); two gradient GEMMs 2BMD each in TF32 reading G and
    C (or A); the normalisation over (B + M)·D. Torch reference: the same 8BMD in fp32 on CUDA
    cores (bf16 is upcast; torch's default disallows TF32 in matmul), plus its fp32 operand copies
    (every candidate tile is rebuilt once per anchor chunk of ``chunk`` rows, in forward and in
    backward) and ~6 elementwise passes over each B × M tile. Each operand is counted once per pass
    (compulsory traffic); launch overheads (~5 µs per kernel) are left out.
    """
    b, m, d, e = rows, sum(blocks), dim, 2
    bmd = b * m * d
    triton = [
        _pass_us(0, (b + m) * d * e, "bf16_flops"),  # norms
        _pass_us(2 * bmd, (b + m) * d * e, "bf16_flops"),  # forward
        _pass_us(2 * bmd, (b + m) * d * e + 4 * b * m, "bf16_flops"),  # G
        _pass_us(2 * bmd, 4 * b * m + m * d * e + 8 * b * d, "tf32_flops"),  # ∂A GEMM
        _pass_us(2 * bmd, 4 * b * m + b * d * e + 4 * m * d, "tf32_flops"),  # ∂C GEMM
        _pass_us(0, 4 * (b + m) * d + 2 * (b + m) * d * e, "bf16_flops"),  # normalise
    ]
    chunks = -(-b // chunk)
    copies = 2 * chunks * m * d * (e + 4) + 2 * b * d * (e + 4)
    reference = [
        _pass_us(0, (b + m) * d * e, "fp32_flops"),  # inverse norms
        _pass_us(8 * bmd, copies + 6 * 4 * b * m + 4 * (b + m) * d * 3, "fp32_flops"),
    ]
    return {"rows": rows, "candidates": m, "dim": dim, "flops": 8 * bmd,
            "triton_us": round(sum(triton), 1), "torch_us": round(sum(reference), 1),
            "predicted_speedup": round(sum(reference) / sum(triton), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bf16 and fp32 only")
    parser.add_argument("--out", default=None, help="result stem (default kernel_resources)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels to compile")
    start = time.perf_counter()
    result = run(["bf16", "fp32"] if args.quick else ["fp32", "bf16", "fp16"])
    result["table"] = markdown_table(result["rows"])
    from pcc_dist.kernels.resources import INFONCE_SHAPES

    result["roofline_h100_computed"] = {name: roofline(*shape)
                                        for name, shape in INFONCE_SHAPES.items()}
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["machine"] = machine_facts()
    stem = args.out or ("kernel_resources_quick" if args.quick else "kernel_resources")
    path = write_result(stem, result)
    print(result["table"])
    for name, row in result["roofline_h100_computed"].items():
        print(f"roofline (computed, H100, bf16) {name}: {row}")
    print(f"{len(result['rows'])} compiled launches in {result['seconds']} s -> {path}")
    for failure in result["failures"]:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
