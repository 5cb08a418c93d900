"""LoRA / QLoRA adapters: target modules, the peft config, the frozen 4-bit base.

peft is imported lazily (:func:`_import_or_error`), so importing this module needs only torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from pcc_dist.config import ModelSettings
from pcc_dist.modeling._core import _PEFT_HINT, ModelError, _import_or_error
from pcc_dist.modeling.model_files import reading

logger = logging.getLogger(__name__)


def lora_target_modules(model: nn.Module) -> list[str]:
    """Names for peft's ``target_modules``: every linear layer but ``lm_head`` (and BERT's pooler).

    Modules are found by type (``nn.Linear`` and its subclasses, which include bitsandbytes'
    ``Linear4bit``), not by hard-coded names, so Llama, Mistral, Qwen, OPT and BERT all work. Leaf
    names (``q_proj``, ``dense``, ...) keep the adapter config short; if a leaf name is shared with
    a module that must not be adapted, full dotted names are returned instead.

    The pooler of BERT-like encoders is skipped: mean/CLS pooling reads the last hidden state, so an
    adapter there would receive no gradient.
    """
    wanted: list[str] = []
    unwanted_leaves: set[str] = set()
    for name, module in model.named_modules():
        if not name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        excluded = (
            leaf == "lm_head" or ".pooler." in f".{name}." or isinstance(module, nn.Embedding)
        )
        if isinstance(module, nn.Linear) and not excluded:
            wanted.append(name)
        else:
            unwanted_leaves.add(leaf)
    if not wanted:
        raise ModelError(
            f"model.mode='lora': {type(model).__name__} has no nn.Linear layers to adapt; set "
            "model.lora.target_modules explicitly."
        )
    leaves = sorted({n.rsplit(".", 1)[-1] for n in wanted})
    if unwanted_leaves.isdisjoint(leaves):
        return leaves
    return wanted


def _lora_config(s: ModelSettings, targets: list[str]) -> Any:
    peft = _import_or_error("peft", "model.mode", s.mode, _PEFT_HINT)
    return peft.LoraConfig(
        r=s.lora.r,
        lora_alpha=s.lora.alpha,
        lora_dropout=float(s.lora.dropout),
        target_modules=targets,
        bias="none",
        task_type=peft.TaskType.FEATURE_EXTRACTION,
    )


def _prepare_for_kbit(backbone: nn.Module) -> nn.Module:
    """Freeze the 4-bit base and keep every parameter in ``model.dtype``.

    peft's ``prepare_model_for_kbit_training`` would also upcast every non-4-bit parameter to fp32.
    With ``dtype=bf16`` that leaves the packed weights stored as bf16 (``bnb_4bit_quant_storage``)
    next to fp32 norms and embeddings: ZeRO-3 flattens parameters into buffers of one dtype, which
    is the reason the storage dtype follows ``model.dtype`` in the first place. The stability the
    upcast buys is kept where it matters: Llama/Mistral/Qwen RMSNorm already compute in fp32.
    Gradient checkpointing is non-reentrant (see :func:`.backbone._enable_checkpointing`), so the
    input-gradient hook peft installs for reentrant checkpointing is not needed.
    """
    for param in backbone.parameters():
        param.requires_grad = False
    return backbone


def _load_adapter(
    backbone: nn.Module, adapter_dir: Path, *, trainable: bool, mode: str
) -> nn.Module:
    """Put the saved peft adapter in ``adapter_dir`` onto ``backbone``.

    Its files are checked beforehand, with the rest of the run folder
    (:func:`.loading.check_run_files`), before the base model is loaded.

    Raises:
        ModelError: peft is missing, or peft cannot load the adapter (its message kept).
    """
    peft = _import_or_error("peft", "model.mode", mode, _PEFT_HINT)
    with reading("the LoRA adapter", adapter_dir):
        return peft.PeftModel.from_pretrained(backbone, str(adapter_dir), is_trainable=trainable)


def merge_for_evaluation(model: nn.Module) -> nn.Module:
    """Fold a (non-quantised) LoRA model's adapters into its base weights, for evaluation only.

    For every adapted linear layer ``W' = W + (alpha / r) * B @ A`` (peft's ``merge_and_unload``),
    so ``W' x = W x + (alpha / r) B (A x)``: the same output up to float rounding (dropout is off
    in evaluation), one matmul per layer instead of three and no peft wrapper modules. Measured
    by benchmarks/eval_speed.py ``--lora-run``. The merged model cannot be trained or saved as an
    adapter again, which is why only evaluation loads take this path.

    Not for QLoRA: folding B A into NF4 weights re-quantises them (W' would be
    ``nf4(dequant(W) + ΔW)``, not the base the adapter was trained against), which changes the
    scores; QLoRA runs are evaluated unmerged.

    Args:
        model: A peft model with LoRA adapters over full-precision (fp32/bf16/fp16) weights.

    Returns:
        The base model with merged weights.
    """
    merged = model.merge_and_unload()
    logger.info("LoRA adapters merged into the base weights for evaluation")
    return merged
