"""The one prepared GPU check (`make gpu-check`): everything this project can only learn on a GPU.

Sized for one ≤ 10-minute call on one H100 (never run yet). Sections, each recorded with its
status, seconds and error (a failing section never loses the others' results):

1. ``kernels``: the compiled Triton kernels against the torch reference, forward and every input
   gradient, in fp32 (rel 1e-5) and bf16 (rel 2e-2, as tests/kernels documents), in both InfoNCE
   modes (split-D at the 7B stage-1 shape, fused at B = 256 vs 16,384 candidates) and for Pearson.
2. ``speed``: Triton vs the torch reference, forward + backward time (CUDA events, median) and
   peak extra memory, InfoNCE up to 65,536 candidates and Pearson up to N = 1M (bf16, D = 1,024).
3. ``training``: a tiny Llama through stage 1 and stage 2 (`launchers/train.py` under torchrun,
   one rank, NCCL), once with QLoRA (bitsandbytes NF4 on CUDA) and once with LoRA (bf16 base),
   each in bf16 with gradient checkpointing, the gradient cache and ``loss.kernel=triton`` on
   DeepSpeed ZeRO-3; then ``pcc-eval --device cuda`` of each run.

Writes ``benchmarks/results/gpu_check.json`` (and ``$OUT/gpu_check.json`` when ``OUT`` is set).
Exit status 1 when a section fails. ``--sections`` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, machine_facts, write_result  # noqa: E402

TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}
# (anchors, candidates per block, D): the two planner modes at the recipe shapes.
INFONCE_CASES = {"stage1_7b_split_d": (32, 256, 4096), "large_fused": (256, 8192, 4096)}
PEARSON_CASES = {"stage2_7b": (30, 4096), "n_65k": (65536, 1024)}


def _rel_error(got, want) -> float:
    scale = want.float().abs().max().clamp_min(1e-30)
    return float((got.float() - want.float()).abs().max() / scale)


def _compare(fn_got, fn_want, tensors) -> float:
    """Largest relative error over the output and every input gradient (grad_output = 0.5)."""
    import torch

    results = []
    for fn in (fn_got, fn_want):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        results.append((out.detach(), torch.autograd.grad(out * 0.5, leaves)))
    (out, grads), (ref, ref_grads) = results
    return max([_rel_error(out, ref)] + [_rel_error(g, w) for g, w in
                                         zip(grads, ref_grads, strict=True)])


def check_kernels(device: str = "cuda", infonce_cases=INFONCE_CASES, pearson_cases=PEARSON_CASES,
                  dtypes: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, Any]:
    """Compiled kernels vs the torch reference; raises AssertionError naming the failing cases.

    InfoNCE goes through the per-anchor cores (what each rank runs after the gather), so one GPU
    reaches the per-rank shapes of an 8-GPU job: B anchors against two blocks of M candidates.
    (tests/kernels/test_gpu_check.py runs this on CPU under the interpreter at tiny shapes.)
    """
    import torch

    from pcc_dist.cross_rank import DEFAULT_EPS
    from pcc_dist.kernels.infonce import InfoNCETritonFunction, Tiles
    from pcc_dist.kernels.launch import target_programs
    from pcc_dist.kernels.pearson import pearson_triton
    from pcc_dist.losses import pearson_reference
    from pcc_dist.losses.reference_infonce import InfoNCEFunction

    gen = torch.Generator(device=device).manual_seed(0)
    options = (Tiles(), target_programs(torch.device(device)), 256 * 2**20)
    rows = []
    for dtype_name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        for case, (b, m, d) in infonce_cases.items():
            tensors = [torch.randn(n, d, device=device, generator=gen).to(dtype)
                       for n in (b, m, m)]
            labels = torch.arange(b, device=device)

            def triton_core(a, p, n, labels=labels):
                return InfoNCETritonFunction.apply(a, labels, 0.05, DEFAULT_EPS, options, p, n)

            def torch_core(a, p, n, labels=labels):
                return InfoNCEFunction.apply(a, labels, 0.05, 1024, DEFAULT_EPS, p, n)

            rows.append({"loss": "infonce", "case": case, "dtype": dtype_name,
                         "max_rel_error": _compare(lambda *t: triton_core(*t).sum(),
                                                   lambda *t: torch_core(*t).sum(), tensors),
                         "tolerance": TOLERANCE[dtype_name]})
        for case, (n, d) in pearson_cases.items():
            a = torch.randn(n, d, device=device, generator=gen)
            pair = (a.to(dtype), (a + torch.randn(n, d, device=device, generator=gen)).to(dtype))
            y = torch.rand(n, device=device, generator=gen) * 5
            rows.append({"loss": "pearson", "case": case, "dtype": dtype_name,
                         "max_rel_error": _compare(
                             lambda x, z, y=y: pearson_triton(x, z, y).loss,
                             lambda x, z, y=y: pearson_reference(x, z, y).loss, pair),
                         "tolerance": TOLERANCE[dtype_name]})
    failures = [r for r in rows if not r["max_rel_error"] <= r["tolerance"]]
    assert not failures, f"kernels differ from the reference beyond tolerance: {failures}"
    return {"rows": rows}


def _time_cuda(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Median milliseconds of ``fn()`` (CUDA events, after one warm-up)."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _peak_mib(fn: Callable[[], Any]) -> float:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def check_speed() -> dict[str, Any]:
    """Triton vs reference: time and peak memory of forward + backward (bf16, D = 1,024)."""
    import torch

    from pcc_dist.kernels.infonce import infonce_triton
    from pcc_dist.kernels.pearson import pearson_triton
    from pcc_dist.losses import infonce_reference, pearson_reference

    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []

    def measure(kind: str, size: int, impls: dict[str, Callable], tensors) -> None:
        for name, fn in impls.items():
            leaves = [t.clone().requires_grad_() for t in tensors]

            def step(fn=fn, leaves=leaves):
                torch.autograd.grad(fn(*leaves), leaves)

            rows.append({"loss": kind, "size": size, "impl": name, "ms": _time_cuda(step),
                         "peak_mib": _peak_mib(step)})

    for n in (1024, 8192, 32768):  # candidates 2n: up to 65,536
        t = [torch.randn(n, 1024, device="cuda", generator=gen, dtype=torch.bfloat16)
             for _ in range(3)]
        measure("infonce", 2 * n, {"triton": infonce_triton, "torch": infonce_reference}, t)
    for n in (16384, 262144, 1 << 20):
        a, b = (torch.randn(n, 1024, device="cuda", generator=gen, dtype=torch.bfloat16)
                for _ in range(2))
        y = torch.rand(n, device="cuda", generator=gen)
        measure("pearson", n, {"triton": lambda x, z, y=y: pearson_triton(x, z, y).loss,
                               "torch": lambda x, z, y=y: pearson_reference(x, z, y).loss},
                (a, b))
    return {"rows": rows}


# The two adapter modes on ZeRO-3 in bf16 with gradient checkpointing: QLoRA (NF4 base, 4 steps a
# stage) and LoRA (bf16 base: ZeRO-3 + frozen parameters + non-reentrant checkpointing, the
# combination fixed in DeepSpeed 0.19.3; 2 steps a stage to stay inside one 10-minute call).
TRAINING_RUNS = {"qlora": 4, "lora": 2}


def training_commands(workdir: Path, model: Path, mode: str, steps: int) -> dict[str, list[str]]:
    """The ``train`` (torchrun, one rank) and ``eval`` (pcc-eval on CUDA) commands of one run."""
    out = workdir / f"run_{mode}"
    train = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
             str(REPO_ROOT / "launchers" / "train.py"),
             "--config", str(REPO_ROOT / "launchers" / "configs" / "tiny_cpu.yaml"),
             f"model.name_or_path={model}", f"run.output_dir={out}", f"model.mode={mode}",
             "model.dtype=bf16", "model.gradient_checkpointing=true", "loss.kernel=triton",
             f"stage1.max_steps={steps}", f"stage2.max_steps={steps}",
             "eval.tasks=[STSBenchmark]"]
    # pcc-eval without relying on the console script (the GPU machine runs from the checkout);
    # --device cuda fails at once instead of scoring on CPU.
    evaluate = [sys.executable, "-c", "import sys; from pcc_dist.cli import eval_main; "
                "sys.exit(eval_main())", "--model", str(out / "model"), "--tasks",
                "STSBenchmark", "--device", "cuda", "--json", str(workdir / f"eval_{mode}.json")]
    return {"train": train, "eval": evaluate}


def check_training(workdir: Path) -> dict[str, Any]:
    """Tiny Llama, stage 1 + 2, QLoRA and LoRA, bf16 + gradient checkpointing on ZeRO-3/NCCL;
    pcc-eval of each run on the GPU."""
    import importlib.util

    missing = [name for name in ("deepspeed", "bitsandbytes", "peft")
               if importlib.util.find_spec(name) is None]
    assert not missing, (f"{missing} not installed for {sys.executable}: run `make gpu-wheels` on "
                         "the development machine and carry .whl (README, GPU check)")
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from helpers.tiny_models import save_tiny_model

    model = save_tiny_model(workdir / "llama", "llama")
    report: dict[str, Any] = {}
    for mode, steps in TRAINING_RUNS.items():
        commands = training_commands(workdir, model, mode, steps)
        logs = {}
        for name, command in commands.items():
            start = time.perf_counter()
            proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=240)
            logs[name] = {"returncode": proc.returncode,
                          "seconds": round(time.perf_counter() - start, 1),
                          "tail": (proc.stdout + proc.stderr)[-3000:]}
            assert proc.returncode == 0, f"{mode} {name} failed:\n{logs[name]['tail']}"
        assert "inference device: cuda" in logs["eval"]["tail"], "pcc-eval did not run on CUDA"
        results = workdir / f"run_{mode}" / "results.json"
        report[mode] = {"commands": {k: " ".join(v) for k, v in commands.items()}, "logs": logs,
                        "results": json.loads(results.read_text()) if results.exists() else None,
                        "eval": json.loads((workdir / f"eval_{mode}.json").read_text())}
    return report


SECTIONS = ("kernels", "speed", "training")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; this check runs on a GPU machine only "
              "(`make gpu-check` there)", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    document: dict[str, Any] = {"machine": machine_facts(),
                                "device": torch.cuda.get_device_name(0), "sections": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {"kernels": check_kernels, "speed": check_speed,
                   "training": lambda: check_training(Path(tmp))}
        for name in args.sections:
            start = time.perf_counter()
            print(f"gpu_check: {name} ...", flush=True)
            try:
                entry = {"status": "ok", **runners[name]()}
            except Exception as err:  # one failing section must not lose the others
                entry = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                         "traceback": traceback.format_exc()[-4000:]}
            entry["seconds"] = round(time.perf_counter() - start, 1)
            document["sections"][name] = entry
            print(f"gpu_check: {name}: {entry['status']} in {entry['seconds']} s", flush=True)
    path = write_result("gpu_check", document)
    if os.environ.get("OUT"):
        write_result("gpu_check", document, Path(os.environ["OUT"]))
    print(f"gpu_check: wrote {path}")
    return 0 if all(s["status"] == "ok" for s in document["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
