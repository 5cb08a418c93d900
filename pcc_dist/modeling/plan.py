"""What :func:`~pcc_dist.modeling.load_embedder` decides before it reads a single weight.

:func:`plan_model` resolves the model source (folder, ``.gguf`` file, offline alias or trained run
folder), reads the Hugging Face config, tells an encoder from a decoder and checks that the pooling
and template options fit that kind. ``load_embedder`` starts from the plan, and
``pcc-train --validate`` stops at it, so both refuse the same settings with the same messages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcc_dist.config import ModelSettings
from pcc_dist.config_checks import model_fit_problems
from pcc_dist.modeling._core import _BNB_HINT, _PEFT_HINT, DTYPES, ModelError, _import_or_error
from pcc_dist.modeling.attention import choose_attn_implementation
from pcc_dist.modeling.model_files import check_model_folder
from pcc_dist.modeling.pooling import infer_kind, resolve_pooling
from pcc_dist.modeling.run_folder import RUN_CONFIG_NAME, read_run_config
from pcc_dist.modeling.settings import model_settings
from pcc_dist.modeling.sources import resolve_model_source
from pcc_dist.modeling.templates import resolve_template

logger = logging.getLogger(__name__)

HF_CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class ModelPlan:
    """The model a config names, checked as far as possible without weights.

    Attributes:
        settings: The validated ``model`` settings.
        source: Folder the model is read from.
        gguf_file: GGUF file inside ``source``, or None.
        run_meta: ``pcc_embedder.json`` when ``source`` is a trained run folder (whose own kind,
            pooling and template then apply), else None.
        hf_config: The Hugging Face config (None for a run folder).
        kind: ``"encoder"`` or ``"decoder"``.
        pooling: The resolved pooling (``"mean"``, ``"cls"`` or ``"last"``).
        attn: The attention implementation to load with (None for a run folder).
        origin: The file ``kind`` was read from (``config.json``, the ``.gguf`` file or
            ``pcc_embedder.json``).
    """

    settings: ModelSettings
    source: str
    gguf_file: str | None
    run_meta: dict[str, Any] | None
    hf_config: Any
    kind: str
    pooling: str
    attn: str | None
    origin: Path


def _read_hf_config(s: ModelSettings, source: str, gguf_file: str | None) -> tuple[Any, Path]:
    """The Hugging Face config of ``source`` and the file it came from.

    Raises:
        ModelError: no ``config.json`` in a folder, or one transformers cannot read.
    """
    from transformers import AutoConfig

    origin = Path(source) / (gguf_file or HF_CONFIG_NAME)
    field = f"model.name_or_path={s.name_or_path!r}"
    if gguf_file is None and not origin.is_file() and any(Path(source).iterdir()):
        raise ModelError(f"{field}: {origin} not found; a Hugging Face model folder holds "
                         f"{HF_CONFIG_NAME} (with its model_type), the weights and the tokenizer "
                         "files. Point model.name_or_path at such a folder.")
    try:
        # Cheap checks of the files transformers would read next (empty folder, damaged
        # config.json, unknown model_type, truncated weights), each naming the file.
        check_model_folder(source, gguf_file=gguf_file, trust_remote_code=s.trust_remote_code)
    except ModelError as exc:
        raise ModelError(f"{field}: {exc}") from exc
    kwargs: dict[str, Any] = {"trust_remote_code": s.trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoConfig.from_pretrained(source, **kwargs), origin
    except (OSError, ValueError) as exc:
        # transformers says which: not JSON, no model_type, a model_type it does not know, or
        # custom code that needs model.trust_remote_code.
        reason = " ".join(str(exc).split())
        raise ModelError(f"{field}: cannot read {origin}: {reason[:300]} Fix the file, or set "
                         "model.trust_remote_code=true for a model that ships its own code."
                         ) from exc


def _kind(s: ModelSettings, hf_config: Any, origin: Path) -> tuple[str, str]:
    """The model kind and, for messages, how it is known."""
    if s.kind != "auto":
        return s.kind, f"model.kind={s.kind!r}"
    kind = infer_kind(hf_config)
    model_type = getattr(hf_config, "model_type", None)
    article = "an" if kind == "encoder" else "a"
    return kind, f"model_type {model_type!r} in {origin} ({article} {kind})"


def _plan_run_folder(s: ModelSettings, source: str) -> ModelPlan:
    """A trained run folder: its own settings apply; its base model must still be found."""
    meta = read_run_config(source)
    if meta["mode"] != "full":
        base = meta["base_model"]
        resolve_model_source(str(base["name_or_path"]), base.get("gguf_file"))
    return ModelPlan(settings=s, source=source, gguf_file=None, run_meta=meta, hf_config=None,
                     kind=meta["kind"], pooling=meta["pooling"], attn=None,
                     origin=Path(source) / RUN_CONFIG_NAME)


def plan_model(cfg: Any) -> ModelPlan:
    """Everything :func:`~pcc_dist.modeling.load_embedder` checks before it reads weights.

    Args:
        cfg: ``ModelSettings`` (or any object/dict with its fields).

    Returns:
        The plan the loader follows.

    Raises:
        ModelError: a setting that cannot work: a missing folder or alias package, a folder
            without a readable ``config.json``, a model whose kind cannot be told, options that
            do not fit the model's kind (each naming the option, the model type and the fix), a
            missing optional dependency of ``model.mode`` or ``model.attn_implementation``.
    """
    s = model_settings(cfg)
    source, gguf_file = resolve_model_source(s.name_or_path, s.gguf_file)
    if gguf_file is None and (Path(source) / RUN_CONFIG_NAME).is_file():
        return _plan_run_folder(s, source)
    hf_config, origin = _read_hf_config(s, source, gguf_file)
    kind, why = _kind(s, hf_config, origin)
    misfits = model_fit_problems(kind, s.pooling, s.template, why)
    if misfits:
        raise ModelError(" ".join(misfits), misfits)
    pooling = resolve_pooling(s.pooling, kind)
    resolve_template(s.template, kind)
    if s.mode == "qlora":
        _import_or_error("bitsandbytes", "model.mode", s.mode, _BNB_HINT)
    if s.mode != "full":
        _import_or_error("peft", "model.mode", s.mode, _PEFT_HINT)
    attn = choose_attn_implementation(s.attn_implementation, DTYPES[s.dtype])
    return ModelPlan(settings=s, source=source, gguf_file=gguf_file, run_meta=None,
                     hf_config=hf_config, kind=kind, pooling=pooling, attn=attn, origin=origin)
