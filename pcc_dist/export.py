"""Export trained embedders: LoRA adapter alone, merged full model, sentence-transformers folder.

All three read a run folder (``pcc_embedder.json`` layout, see :mod:`pcc_dist.modeling`) or an
in-memory :class:`~pcc_dist.modeling.Embedder`, and write a new folder:

``adapter``
    peft's ``adapter_config.json`` + ``adapter_model.safetensors`` (what
    ``PeftModel.from_pretrained`` loads onto the base named in ``base_model_name_or_path``), plus
    ``pcc_embedder.json`` for the prompt/pooling it was trained with.
``merged``
    A plain Hugging Face model folder (``AutoModel.from_pretrained`` loads it, no peft needed) and a
    ``pcc_embedder.json`` with ``mode: "full"``, so pcc_dist loads it as a run folder too. A QLoRA
    base is first **dequantised** from its NF4 weights and the adapter is merged into those, so the
    merged model computes what the trained model computed (merging into the original full-precision
    base would not: the adapter was fitted to the quantised weights). ``quantization="none"`` merges
    into the original base instead (logged).
``sentence-transformers``
    The merged folder saved again by sentence-transformers' own ``SentenceTransformer.save()``
    from its own modules (:mod:`pcc_dist.st_modules`), so that
    ``SentenceTransformer(path).encode(sentences)`` reproduces :meth:`Embedder.encode`, plus a
    model card (README.md, :mod:`pcc_dist.model_card`). Standard modules only, no
    ``trust_remote_code``:

    * ``Transformer`` + ``Pooling`` (``lasttoken`` for decoders, ``mean``/``cls`` for encoders), no
      ``Normalize`` (our embeddings are raw; cosine similarity is unaffected).
    * The prompt wraps the sentence (PromptEOL has a prefix *and* a suffix), while
      sentence-transformers' ``prompts`` are prefix-only. sentence-transformers 6 renders any
      tokenizer that has a ``chat_template`` through it (the "message" modality): the export writes
      a chat template that renders ``<special prefix>`` + template prefix + sentence + template
      suffix, with no role markup. When truncation cuts a long input, sentence-transformers restores
      the template's tail tokens (``restore_suffix``), matching our rule that the sentence, not the
      prompt, is cut. The export checks on probe sentences that the chat-template path produces
      exactly our token ids.
    * Decoder tokenizers are saved with ``padding_side="right"``: sentence-transformers does not
      pass position ids, so left padding would shift learned absolute positions (OPT) of shorter
      rows; with right padding positions are 0..n-1 as when embedding alone, causal attention keeps
      pads invisible, and ``lasttoken`` pooling finds the last real token from the mask.
    * ``max_seq_length`` = our sentence limit + the template/special-token overhead.

    Needs sentence-transformers >= 6 to load (older releases ignore the chat template and would
    embed the bare sentence). A sentence longer than the limit is cut at a token boundary by
    sentence-transformers but at the same token's character boundary and re-tokenised by pcc_dist;
    the two agree on the tested tokenizers (SmolLM2's BPE, word-level) and could differ slightly
    where re-tokenisation merges differently.

Targets. An export never writes into the folders it reads (the run folder, a LoRA run's base
model folder), into a folder inside them or into one containing them, and never into a training
run folder (``run.output_dir``, checkpoints and all). A non-empty target is refused unless
``overwrite=True`` (``--overwrite``). Every export is written into a temporary sibling folder
(``.<name>.tmp-…``) and renamed into place only when complete, so a failed export leaves no
half-written target; with ``overwrite`` the old target is renamed away (``.<name>.old-…``) just
before and deleted just after the new one moves in (:mod:`pcc_dist.export_target`).

The console script ``pcc-export`` calls :func:`export_main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pcc_dist.errors import PccError
from pcc_dist.export_target import ExportError, check_target, folders_read, staged
from pcc_dist.model_card import write_model_card
from pcc_dist.modeling import (
    ADAPTER_DIR,
    DTYPES,
    QUANTIZATION_CHOICES,
    RUN_CONFIG_NAME,
    Embedder,
    _base_source,
    _load_adapter,
    _load_backbone,
    _load_tokenizer,
    check_adapter_folder,
    check_run_files,
    load_embedder_from_run,
    model_settings,
    read_run_config,
    resolve_training_run,
    save_embedder,
)
from pcc_dist.st_modules import (
    PROBES,
    chat_template_for,
    check_chat_template,
    import_sentence_transformers,
    save_sentence_transformer,
)

logger = logging.getLogger(__name__)

FORMATS = ("adapter", "merged", "sentence-transformers")

def _run_dir(source: str | os.PathLike | Embedder, tmp: Path) -> Path:
    """A run folder for ``source``: the folder itself (a training run folder's ``model/``), or an
    in-memory Embedder saved to ``tmp``."""
    if isinstance(source, Embedder):
        return save_embedder(source, tmp / "run")
    path = resolve_training_run(source)
    read_run_config(path)
    return path


@contextmanager
def _export(
    source: str | os.PathLike | Embedder, out: Path, overwrite: bool
) -> Iterator[tuple[Path, dict[str, Any], Path]]:
    """Checked source and target: yields ``(run folder, its metadata, staging folder)``."""
    with tempfile.TemporaryDirectory() as tmp:
        run = _run_dir(source, Path(tmp))
        meta = read_run_config(run)
        check_target(out, folders_read(run, meta), overwrite)
        with staged(out) as staging:
            yield run, meta, staging


def _write_meta(out: Path, meta: dict[str, Any]) -> None:
    (out / RUN_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def export_adapter(
    source: str | os.PathLike | Embedder, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write the LoRA adapter alone (peft format) plus ``pcc_embedder.json``.

    Args:
        source: run folder, training run folder or Embedder.
        out_dir: target folder (new or empty unless ``overwrite``).
        overwrite: replace a non-empty ``out_dir`` once the export is complete.

    Raises:
        ExportError: the run is a full fine-tune (it has no adapter), or the target is refused.
        ModelError: the adapter files are missing or damaged.
    """
    out = Path(out_dir)
    with _export(source, out, overwrite) as (run, meta, staging):
        if meta["mode"] == "full":
            raise ExportError(
                f"{run}: mode='full' has no LoRA adapter to export; use --format merged or "
                "--format sentence-transformers."
            )
        check_adapter_folder(run / ADAPTER_DIR)
        shutil.copytree(run / ADAPTER_DIR, staging, dirs_exist_ok=True)
        _write_meta(staging, meta)
    logger.info("exported the %s adapter to %s", meta["mode"], out)
    return out


def _merged_backbone(
    run: Path, meta: dict[str, Any], quantization: str, dtype: str
) -> torch.nn.Module:
    """The run's backbone with the adapter merged into (dequantised) base weights, in ``dtype``."""
    if quantization not in QUANTIZATION_CHOICES:
        raise ExportError(
            f"quantization={quantization!r} is not one of {list(QUANTIZATION_CHOICES)}."
        )
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} is not one of {list(DTYPES)}.")
    settings = model_settings({"dtype": dtype, "attn_implementation": "sdpa"})
    if meta["mode"] == "full":
        return _load_backbone(str(run), None, settings, quantize=False, attn="sdpa")

    source, gguf_file = _base_source(run, meta)
    quant = meta.get("quantization")
    if quant and quantization == "as_trained":
        settings = model_settings(
            {
                "dtype": meta.get("dtype", "fp32"),
                "mode": "qlora",
                "attn_implementation": "sdpa",
                "qlora": {
                    "compute_dtype": quant.get("compute_dtype", "bf16"),
                    "double_quant": quant.get("double_quant", True),
                    "quant_storage_dtype": quant.get("quant_storage_dtype", "auto"),
                },
            }
        )
        base = _load_backbone(source, gguf_file, settings, quantize=True, attn="sdpa")
        # NF4 -> float with the exact values the trained model multiplied with.
        base = base.dequantize(dtype=DTYPES[dtype])
        logger.info("dequantised the NF4 base to %s before merging", dtype)
    else:
        if quant:
            logger.warning(
                "merging the adapter of a QLoRA run into the original full-precision base "
                "(quantization='none'); the merged model differs from the trained one"
            )
        base = _load_backbone(source, gguf_file, settings, quantize=False, attn="sdpa")
    model = _load_adapter(base, run / ADAPTER_DIR, trainable=False, mode=meta["mode"])
    merged = model.merge_and_unload()
    return merged.to(DTYPES[dtype])


def export_merged(
    source: str | os.PathLike | Embedder,
    out_dir: str | os.PathLike,
    *,
    quantization: str = "as_trained",
    dtype: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Write a merged full model (HF folder + tokenizer + ``pcc_embedder.json`` with mode "full").

    Args:
        source: run folder, training run folder or Embedder.
        out_dir: target folder (new or empty unless ``overwrite``).
        quantization: ``"as_trained"`` merges into the dequantised NF4 base of a QLoRA run;
            ``"none"`` into the original full-precision base.
        dtype: weight dtype of the merged model (default fp32, "full precision").
        overwrite: replace a non-empty ``out_dir`` once the export is complete.

    Raises:
        ExportError: the target is refused or cannot be written.
        ModelError: the run folder or its base model is missing or damaged.
    """
    out = Path(out_dir)
    with _export(source, out, overwrite) as (run, meta, staging):
        _write_merged(run, meta, staging, quantization, dtype)
    logger.info("exported a merged %s model to %s", dtype, out)
    return out


def _write_merged(
    run: Path, meta: dict[str, Any], out: Path, quantization: str, dtype: str
) -> None:
    """The merged model, the run's tokenizer and the merged ``pcc_embedder.json`` into ``out``."""
    check_run_files(run)  # every file (adapter, base) before the first weight is loaded
    model = _merged_backbone(run, meta, quantization, dtype)
    model.save_pretrained(out)
    _load_tokenizer(str(run), None, False).save_pretrained(out)
    merged_meta = dict(meta)
    merged_meta.update(
        mode="full",
        dtype=dtype,
        quantization=None,
        lora=None,
        merged_from={
            "mode": meta["mode"],
            "quantization": meta.get("quantization"),
            "lora": meta.get("lora"),
        },
    )
    _write_meta(out, merged_meta)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pcc-dist")
    except PackageNotFoundError:
        return "unknown"


def export_sentence_transformers(
    source: str | os.PathLike | Embedder,
    out_dir: str | os.PathLike,
    *,
    quantization: str = "as_trained",
    dtype: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Write a folder that ``SentenceTransformer(out_dir)`` loads and that embeds as pcc_dist does.

    The folder is the merged model (see :func:`export_merged`) plus the sentence-transformers module
    files; design notes in the module docstring.

    Raises:
        ExportError: the tokenizer cannot reproduce the prompt through a chat template, or the
            target is refused or cannot be written.
        ModelError: the run folder or its base model is missing or damaged.
    """
    out = Path(out_dir)
    with _export(source, out, overwrite) as (run, meta, staging):
        _write_merged(run, meta, staging, quantization, dtype)
        _write_sentence_transformers(staging)
        write_model_card(staging, read_run_config(staging),
                         None if isinstance(source, Embedder) else run)
    logger.info("exported a sentence-transformers folder to %s", out)
    return out


def _write_sentence_transformers(folder: Path) -> None:
    """Add the sentence-transformers files and the prompt's chat template to a merged folder."""
    meta = read_run_config(folder)
    tokenizer = _load_tokenizer(str(folder), None, False)
    # A light Embedder over the exported tokenizer gives the reference token ids (no weights
    # needed).
    reference = Embedder(
        torch.nn.Identity(),
        tokenizer,
        kind=meta["kind"],
        pooling=meta["pooling"],
        template=meta["template"],
        max_length=meta["max_length"],
    )
    tokenizer.padding_side = "right"
    max_seq_length = reference.max_length + reference.overhead_tokens()
    if reference.template is not None:
        if getattr(tokenizer, "chat_template", None):
            logger.info("replacing the tokenizer's chat template with the prompt template")
        tokenizer.chat_template = chat_template_for(reference)
        check_chat_template(reference, tokenizer)
    else:
        tokenizer.chat_template = None
    # sentence-transformers truncates at the tokenizer's model_max_length.
    tokenizer.model_max_length = max_seq_length
    tokenizer.save_pretrained(folder)
    # Then sentence-transformers' own modules over that folder, written by its own save().
    save_sentence_transformer(folder, pooling=meta["pooling"],
                              prompted=reference.template is not None,
                              max_seq_length=max_seq_length)


def verify_sentence_transformers(
    folder: str | os.PathLike,
    embedder: Embedder,
    sentences: Sequence[str],
    *,
    min_cosine: float = 0.9999,
) -> torch.Tensor:
    """Embed with ``SentenceTransformer(folder)`` and with ``embedder``; return the cosines.

    Raises:
        ExportError: sentence-transformers is missing, or a cosine is below ``min_cosine``.
    """
    SentenceTransformer = import_sentence_transformers()[0]  # noqa: N806 - a class
    model = SentenceTransformer(str(folder), device=str(embedder.device))
    theirs = (
        model.encode(list(sentences), convert_to_tensor=True, normalize_embeddings=False)
        .float()
        .cpu()
    )
    ours = embedder.encode(list(sentences))
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    if cosine.min() < min_cosine:
        worst = int(cosine.argmin())
        raise ExportError(
            "sentence-transformers export disagrees with pcc_dist: cosine "
            f"{cosine[worst]:.6f} < {min_cosine} for {sentences[worst]!r}."
        )
    return cosine


def export_main(argv: Sequence[str] | None = None) -> int:
    """``pcc-export RUN_DIR OUT_DIR --format {adapter,merged,sentence-transformers} [--overwrite]``.

    Returns:
        The exit code: 0 on success, 2 on a model/export error (message on stderr).
    """
    parser = argparse.ArgumentParser(
        prog="pcc-export",
        description="Export a pcc_dist run folder: the LoRA adapter alone, a merged "
        "full-precision model, or a sentence-transformers folder.",
    )
    parser.add_argument(
        "run_dir",
        help="run folder holding pcc_embedder.json, or a training run folder (its model/)",
    )
    parser.add_argument(
        "out_dir", help="folder to write: new or empty, outside run_dir (see --overwrite)"
    )
    parser.add_argument("--format", choices=FORMATS, default="sentence-transformers")
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATION_CHOICES,
        default="as_trained",
        help="as_trained: merge into the dequantised NF4 base of a QLoRA run (default); "
        "none: into the original full-precision base",
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="fp32", help="weights of merged exports"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="sentence-transformers format: load the export and compare its embeddings with "
        "pcc_dist's on probe sentences",
    )
    parser.add_argument(
        "--device", default="auto",
        help="where --verify embeds: auto (CUDA when available), cpu, cuda or cuda:N",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty out_dir; the new export is written next to it and replaces it "
        "only when complete (never a training run folder or a folder the export reads)",
    )
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    try:
        if args.format == "adapter":
            export_adapter(args.run_dir, args.out_dir, overwrite=args.overwrite)
        else:
            export = export_merged if args.format == "merged" else export_sentence_transformers
            export(
                args.run_dir,
                args.out_dir,
                quantization=args.quantization,
                dtype=args.dtype,
                overwrite=args.overwrite,
            )
        if args.verify and args.format == "sentence-transformers":
            _verify(args.run_dir, args.out_dir, args.quantization, args.device)
    except PccError as exc:
        print(f"pcc-export: {exc}", file=sys.stderr)
        return 2
    return 0


def _verify(run_dir: str, out_dir: str, quantization: str, device: str = "auto") -> None:
    """``--verify``: the export's embeddings against pcc_dist's on the probe sentences (both on
    the ``--device`` chosen by :func:`pcc_dist.devices.choose_device`)."""
    from pcc_dist.devices import choose_device, place_for_inference

    where = choose_device(device)  # before the weights load: a wrong flag fails at once
    embedder = place_for_inference(load_embedder_from_run(run_dir, quantization=quantization),
                                   where)
    cosine = verify_sentence_transformers(out_dir, embedder, [p for p in PROBES if p.strip()])
    logger.info(
        "verified: min cosine %.6f over %d probe sentences", float(cosine.min()), len(cosine)
    )
