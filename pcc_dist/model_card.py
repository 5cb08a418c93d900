"""README.md model card of an exported folder: base model, recipe, data, STS7, commands.

Everything comes from files the run wrote, never from memory: the exported model's
``pcc_embedder.json`` (base model, prompt, pooling, LoRA), and, when the export reads a training
run (``<run>/model``), that run's resolved ``config.yaml`` (the recipe and the command that
reproduces it) and ``results.json`` (per-stage data counts and de-contamination, the STS table).
A section without its source says so instead of guessing.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from pcc_dist.config_checks import STS7_TASKS

_LABELS = {"STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R"}
CARD_NAME = "README.md"


def _read(path: Path, loader: Any) -> dict[str, Any] | None:
    try:
        value = loader(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return value if isinstance(value, dict) else None


def training_run_of(model_folder: Path) -> Path | None:
    """The training run folder a run's ``model/`` folder belongs to (holds config.yaml), or None."""
    for folder in (model_folder, model_folder.parent):
        if (folder / "config.yaml").is_file():
            return folder
    return None


def sts_table(sts: dict[str, Any]) -> str:
    """The Markdown table of an STS result (``results.json["sts"]``), tasks in STS7 order, x100."""
    scores = sts.get("spearman") or {}
    tasks = [t for t in STS7_TASKS if t in scores] + [t for t in scores if t not in STS7_TASKS]
    head = [_LABELS.get(t, t) for t in tasks] + ["Avg."]
    values = [f"{scores[t]:.2f}" for t in tasks] + [f"{sts.get('avg', float('nan')):.2f}"]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      "| " + " | ".join(values) + " |"])


def _recipe(meta: dict[str, Any], config: dict[str, Any] | None) -> list[str]:
    lines = [f"- kind: {meta.get('kind')}, pooling: {meta.get('pooling')}, "
             f"max sentence tokens: {meta.get('max_length')}",
             f"- prompt: {meta.get('template_name') or ''} `{meta.get('template')}`"
             if meta.get("template") else "- prompt: none"]
    trained = meta.get("merged_from") or meta
    lines.append(f"- fine-tuning: {trained.get('mode')}"
                 + (f" (LoRA r={trained['lora']['r']}, alpha={trained['lora']['alpha']})"
                    if trained.get("lora") else "")
                 + (f", merged into the {trained.get('quantization')} base"
                    if meta.get("merged_from") and trained.get("quantization") else ""))
    if config is None:
        lines.append("- training settings: not recorded with this model (no config.yaml).")
        return lines
    for name, label in (("stage1", "stage 1, InfoNCE"), ("stage2", "stage 2, Pcc (1 - r)")):
        stage = config.get(name) or {}
        if stage.get("enabled", True):
            lines.append(f"- {label}: data `{stage.get('data')}`, global batch "
                         f"{stage.get('global_batch_size')}, lr {stage.get('lr')}, warmup "
                         f"{stage.get('warmup_steps')}, epochs {stage.get('epochs')}, max steps "
                         f"{stage.get('max_steps')}")
    return lines


def _data(results: dict[str, Any] | None, config: dict[str, Any] | None) -> list[str]:
    if results is None:
        return ["Not recorded with this model (no results.json)."]
    lines = []
    decontaminate = (config or {}).get("data", {}).get("decontaminate")
    for name, outcome in (results.get("stages") or {}).items():
        report = outcome.get("decontamination")
        if not report:
            lines.append(f"- {name}: {outcome.get('steps')} steps; de-contamination off "
                         f"(data.decontaminate={decontaminate}).")
            continue
        removed = sum((report.get("removed_per_source") or {}).values())
        lines.append(f"- {name}: {outcome.get('steps')} steps on {report.get('kept')} of "
                     f"{report.get('total')} training items; {removed} removed because they "
                     f"occur in an STS7 test set (per source {report.get('removed_per_source')},"
                     f" per test task {report.get('removed_per_task')}).")
    return lines or ["No stage outcome recorded."]


def model_card(meta: dict[str, Any], run: Path | None, export_command: list[str]) -> str:
    """The Markdown text of README.md (with the Hub's YAML header)."""
    config = _read(run / "config.yaml", yaml.safe_load) if run else None
    results = _read(run / "results.json", json.loads) if run else None
    base = (meta.get("merged_from") or meta).get("base_model") or meta.get("base_model") or {}
    base_name = str(base.get("name_or_path", "unknown"))
    header = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
              "tags": ["sentence-transformers", "sentence-similarity", "pcc-tuning", "pcc_dist"]}
    if (base_name.count("/") == 1 and not base_name.startswith(("/", ".", "~"))
            and not Path(base_name).exists()):  # owner/name: a hub id
        header["base_model"] = base_name
    name = (config or {}).get("run", {}).get("name") or "pcc_dist embedder"
    sts = (results or {}).get("sts")
    parts = [
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        "A sentence embedder fine-tuned with Pcc-tuning (stage 1: contrastive InfoNCE on NLI "
        "triplets; stage 2: 1 - Pearson r against graded similarity scores) by pcc_dist.", "",
        "## Base model", "", f"`{base_name}`"
        + (f" (GGUF file `{base['gguf_file']}`)" if base.get("gguf_file") else ""), "",
        "## Recipe", "", *_recipe(meta, config), "",
        "## Data and de-contamination", "", *_data(results, config), "",
        "## STS results (Spearman x 100, SentEval protocol)", "",
        sts_table(sts) if sts else "No STS evaluation was recorded for this run.", "",
        "## Usage", "", "```python", "from sentence_transformers import SentenceTransformer",
        "", "model = SentenceTransformer(\"path/to/this/folder\")",
        "embeddings = model.encode([\"A man is playing a guitar.\", \"A dog runs.\"])",
        "```", "",
        "The prompt is applied by the tokenizer's chat template (sentence-transformers >= 6).", "",
        "## How it was made", "", "```bash",
    ]
    if run is not None and config is not None:
        parts.append(f"pcc-train --config {shlex.quote(str(run / 'config.yaml'))}"
                     "  # the run's resolved config")
    parts += [" ".join(shlex.quote(a) for a in export_command), "```", ""]
    return "\n".join(parts)


def write_model_card(folder: Path, meta: dict[str, Any], model_folder: Path | None,
                     export_command: list[str] | None = None) -> Path:
    """Write ``folder/README.md`` for the export of ``model_folder`` (None: an in-memory model).

    Args:
        folder: The export folder.
        meta: The exported model's ``pcc_embedder.json``.
        model_folder: The run folder the export read (its training run is looked up from it).
        export_command: The command line to record; default ``sys.argv``.
    """
    run = training_run_of(model_folder) if model_folder is not None else None
    command = export_command if export_command is not None else [Path(sys.argv[0]).name,
                                                                 *sys.argv[1:]]
    path = folder / CARD_NAME
    path.write_text(model_card(meta, run, command), encoding="utf-8")
    return path
