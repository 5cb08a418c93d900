"""The README's per-recipe memory table: GPU memory per rank, host memory per node and disk, for
every YAML under launchers/configs/, **computed** (not measured) by :mod:`pcc_dist.memory_plan`
from the parameter counts and what the code does (ZeRO-3 partitioning, fp32 gradient
accumulation, Adam states on the GPU or offloaded, the parameter-offload choice of
:mod:`pcc_dist.offload` on 80 GB GPUs, keep_last + the checkpoint being written, the final model).

Parameter counts come from the architecture alone (the model is built on the meta device): the
7B recipes' hub models from their published architecture numbers (no download), the aliases from
their bundled config.json. Activations are not included (the gradient cache bounds them to one
chunk of C sequences per rank).

Writes ``benchmarks/results/memory_table.json`` and prints the Markdown table.

    .venv/bin/python benchmarks/memory_table.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, write_result  # noqa: E402

GIB = 2**30
GPU_BYTES = 80 * 10**9  # A100/H100 80 GB
GPUS_PER_NODE = 8


def _published_architecture(name: str) -> Any:
    """The 7B recipes' models, from their published config.json numbers."""
    from transformers import LlamaConfig, MistralConfig

    if name == "mistralai/Mistral-7B-v0.1":
        return MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    if name == "meta-llama/Llama-2-7b-hf":
        return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    return None


def _hf_config(cfg: Any) -> Any:
    known = _published_architecture(cfg.model.name_or_path)
    if known is not None:
        return known
    from pcc_dist.modeling import ModelError, plan_model

    try:
        return plan_model(cfg.model).hf_config
    except ModelError:
        return None


def recipe_row(path: Path) -> dict[str, Any]:
    """One recipe's figures, or why it has none."""
    from pcc_dist.config import load_config
    from pcc_dist.ds_config import find_ds_config
    from pcc_dist.memory_plan import count_params, plan_memory
    from pcc_dist.offload import choose_param_offload

    cfg = load_config(str(path), [])
    hf_config = _hf_config(cfg)
    row: dict[str, Any] = {"recipe": path.name, "model": cfg.model.name_or_path,
                           "mode": cfg.model.mode, "dtype": cfg.model.dtype}
    if hf_config is None:
        return row | {"skipped": "model not available offline (a test-only folder)"}
    ds = json.loads(find_ds_config(cfg.train.deepspeed_config).read_text())
    zero = ds.get("zero_optimization", {})
    is_7b = _published_architecture(cfg.model.name_or_path) is not None
    world = GPUS_PER_NODE if is_7b else 1
    counts = count_params(hf_config, cfg.model.mode, cfg.model.lora.r,
                          cfg.model.lora.target_modules)
    # What build_engine decides on an 80 GB GPU.
    ds = choose_param_offload(ds, counts.total, world, GPU_BYTES)
    zero = ds.get("zero_optimization", {})
    offloaded = {key: isinstance(zero.get(key), dict) and zero[key].get("device") == "cpu"
                 for key in ("offload_optimizer", "offload_param")}
    stages = [name for name in ("stage1", "stage2") if getattr(cfg, name).enabled]
    plan = plan_memory(counts, mode=cfg.model.mode, dtype=cfg.model.dtype,
                       zero_stage=int(zero.get("stage", 0)), world_size=world,
                       ranks_per_node=world, optimizer_offload=offloaded["offload_optimizer"],
                       param_offload=offloaded["offload_param"],
                       keep_last=cfg.checkpoint.keep_last)
    return row | {"zero_stage": int(zero.get("stage", 0)), "stages": stages,
                  "disk_run": len(stages) * plan.disk_per_stage + plan.final_model,
                  **plan.to_json()}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| recipe | params (trainable) | ranks | GPU / rank | host / node | "
             "checkpoint | disk, whole run |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            continue
        offload = ("optimizer" if r["optimizer_offload"] else "") + \
            (" + params" if r["param_offload"] else "")
        host = f"{r['host_per_node_steady'] / GIB:.1f} GiB" + (f" ({offload})" if offload else "")
        lines.append(
            f"| {r['recipe']} | {r['params_total'] / 1e9:.2f} B ({r['params_trainable'] / 1e6:.1f}"
            f" M) | {r['world_size']} | {r['gpu_per_rank'] / GIB:.1f} GiB | "
            f"{host}, load peak {r['host_per_node_load_peak'] / GIB:.0f} GiB | "
            f"{r['checkpoint'] / GIB:.2f} GiB | "
            f"{r['disk_run'] / GIB:.1f} GiB |")
    return "\n".join(lines)


def main() -> int:
    rows = [recipe_row(p) for p in sorted((REPO_ROOT / "launchers" / "configs").glob("*.yaml"))]
    write_result("memory_table", {"computed_not_measured": True, "gpu_bytes": GPU_BYTES,
                                  "recipes": rows})
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
