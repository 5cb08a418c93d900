"""Cheap checks of a model folder's files before transformers reads them, and a net for the rest.

Handed a damaged folder, transformers and safetensors fail with whatever their code hits first
(``OSError``, ``ValueError``, ``SafetensorError``, a ``ZeroDivisionError`` from a config with zero
attention heads, ...) and a traceback that rarely names the file at fault. The checks here read
only small files and headers (``config.json``, the JSON header of every ``.safetensors`` file,
``adapter_config.json``) and raise a :class:`ModelError` naming the file, what is wrong with it
and the fix. What they cannot see (numbers in a config that do not fit the weights, a tokenizer
file cut short) is caught by :func:`reading`, which keeps transformers' own message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pcc_dist.modeling._core import ModelError

CONFIG_NAME = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
# Pickled torch weights have no header to check cheaply; transformers reads them weights_only.
_BIN_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# safetensors refuses headers above 100 MB; a larger length field is damage, not a big model.
_MAX_HEADER_BYTES = 100_000_000
_GGUF_MAGIC = b"GGUF"

RECOPY = "copy the folder again from where it was made, or save the model again"


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """Read a JSON file that must hold an object.

    Args:
        path: the file.
        fix: what the user should do, appended to every error.

    Raises:
        ModelError: the file is missing, unreadable, not JSON (truncated or damaged) or not an
            object; the message names the file.
    """
    if not path.is_file():
        raise ModelError(f"{path}: missing; {fix}.")
    try:
        value = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}): the "
            f"file is truncated or damaged; {fix}."
        ) from exc
    except (UnicodeDecodeError, RecursionError, OSError) as exc:
        raise ModelError(f"{path}: cannot be read as JSON text ({exc}); {fix}.") from exc
    if not isinstance(value, dict):
        raise ModelError(
            f"{path}: holds a JSON {type(value).__name__}, not an object; the file is damaged; "
            f"{fix}."
        )
    return value


def check_model_folder(
    folder: str | os.PathLike, *, gguf_file: str | None = None, trust_remote_code: bool = False
) -> None:
    """Check what transformers will read from a Hugging Face model folder, without loading it.

    The folder must not be empty; ``config.json`` must parse and name a ``model_type`` this
    transformers knows (or bring its own code, with ``trust_remote_code``); every weight file
    must be present and consistent with its header. With ``gguf_file`` only the GGUF file's magic
    bytes are checked: it carries its own config.

    Raises:
        ModelError: naming the folder or file, what is wrong and the fix.
    """
    path = Path(folder)
    try:
        if gguf_file is not None:
            _check_gguf(path / gguf_file)
        else:
            _check_hf_folder(path, trust_remote_code)
    except OSError as exc:
        raise _unreadable(exc) from exc


def _check_hf_folder(path: Path, trust_remote_code: bool) -> None:
    names = sorted(p.name for p in path.iterdir())
    if not names:
        raise ModelError(
            f"model folder {path} is empty; point it at the folder a model was saved in "
            "(config.json, model.safetensors and tokenizer files), e.g. a run's model/ folder."
        )
    if CONFIG_NAME not in names:
        raise ModelError(
            f"model folder {path} has no {CONFIG_NAME} (it holds {', '.join(names[:6])}"
            f"{', ...' if len(names) > 6 else ''}), so it is not a saved Hugging Face model; "
            f"point it at the folder a model was saved in, or {RECOPY}."
        )
    config = read_json_object(path / CONFIG_NAME, RECOPY)
    _check_model_type(config, path / CONFIG_NAME, trust_remote_code)
    _check_weights(path)


def _check_model_type(config: dict[str, Any], file: Path, trust_remote_code: bool) -> None:
    """``model_type`` must name an architecture of the installed transformers."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(
            f"{file}: no model_type (got {model_type!r}); save_pretrained always writes one, so "
            f"the file is damaged or was written by hand; {RECOPY}."
        )
    if trust_remote_code and "auto_map" in config:
        return  # the folder's own modelling code defines the architecture
    from transformers import CONFIG_MAPPING, __version__

    if model_type not in CONFIG_MAPPING:
        raise ModelError(
            f"{file}: model_type={model_type!r} is not an architecture transformers {__version__} "
            "knows. Install a transformers release that has it; for a folder with its own "
            "modelling code that you trust, set model.trust_remote_code=true; if the folder "
            f"should hold a known model, {CONFIG_NAME} is damaged: {RECOPY}."
        )


def _check_weights(folder: Path) -> None:
    """Every weight file the folder names is present and each safetensors file is complete."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        shards = _index_shards(index)
    else:
        shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        if any((folder / name).is_file() for name in _BIN_WEIGHTS):
            return
        raise ModelError(
            f"model folder {folder} has {CONFIG_NAME} but no weights (model.safetensors); the "
            f"copy is incomplete or the save did not finish; {RECOPY}."
        )
    for shard in shards:
        _check_safetensors(shard)


def _index_shards(index: Path) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` names; all of them must exist."""
    weight_map = read_json_object(index, RECOPY).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()
    ):
        raise ModelError(f"{index}: no valid weight_map; the file is damaged; {RECOPY}.")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise ModelError(
            f"{index} names weight files that are missing: {', '.join(missing)}; the copy is "
            f"incomplete; {RECOPY}."
        )
    return shards


def _check_safetensors(path: Path) -> None:
    """Read a ``.safetensors`` header and check that the file holds all the data it announces.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's
    ``data_offsets`` into the data section, then the data; a file cut short (an interrupted copy,
    a full disk while saving) holds less data than its header's largest end offset.

    Raises:
        ModelError: naming the file, the sizes that disagree and the fix.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        length_field = handle.read(8)
        if len(length_field) < 8:
            raise _damaged(path, f"it is {size} bytes long, shorter than the 8-byte header length")
        header_bytes = int.from_bytes(length_field, "little")
        if header_bytes > size - 8:
            raise _damaged(
                path,
                f"its header length field says {header_bytes} bytes but only {size - 8} follow",
            )
        if header_bytes > _MAX_HEADER_BYTES:
            raise _damaged(path, f"its header length field says {header_bytes} bytes (> 100 MB)")
        raw = handle.read(header_bytes)
    try:
        header = json.loads(raw)
    # A damaged header may also nest brackets deeper than the JSON parser recurses.
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _damaged(path, f"its header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    data_bytes = size - 8 - header_bytes
    end = _data_end(header, path)
    if end != data_bytes:
        raise _damaged(
            path,
            f"its header announces {end} bytes of tensor data but {data_bytes} follow it",
        )


def _data_end(header: dict[str, Any], path: Path) -> int:
    """The largest ``data_offsets`` end in a safetensors header (0 for a file of no tensors)."""
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        valid = (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(x) is int for x in offsets)
            and 0 <= offsets[0] <= offsets[1]
        )
        if not valid:
            raise _damaged(path, f"tensor {name!r} has no valid data_offsets in its header")
        end = max(end, offsets[1])
    return end


def _damaged(path: Path, reason: str) -> ModelError:
    return ModelError(
        f"{path}: {reason}; the file is truncated or damaged (an interrupted copy or download, "
        f"or a full disk while saving); {RECOPY}."
    )


def _check_gguf(path: Path) -> None:
    with path.open("rb") as handle:
        magic = handle.read(len(_GGUF_MAGIC))
    if magic != _GGUF_MAGIC:
        raise ModelError(
            f"{path}: not a GGUF file (it does not start with the bytes {_GGUF_MAGIC!r}); the file "
            f"is truncated or damaged, or another format with a .gguf name; {RECOPY}."
        )


def check_adapter_folder(folder: Path) -> None:
    """Check a peft adapter folder: ``adapter_config.json`` parses, the weights are complete.

    Raises:
        ModelError: the folder is missing or one of its files is missing, unreadable or damaged.
    """
    try:
        _check_adapter_files(folder)
    except OSError as exc:
        raise _unreadable(exc) from exc


def _check_adapter_files(folder: Path) -> None:
    if not folder.is_dir():
        raise ModelError(
            f"{folder.parent} is a LoRA run folder but has no {folder.name}/ folder (the LoRA "
            f"adapter); the copy is incomplete or the save did not finish; {RECOPY}."
        )
    read_json_object(folder / ADAPTER_CONFIG, RECOPY)
    weights = folder / ADAPTER_SAFETENSORS
    if weights.is_file():
        _check_safetensors(weights)
    elif not (folder / ADAPTER_BIN).is_file():
        raise ModelError(
            f"adapter folder {folder} has no {ADAPTER_SAFETENSORS}; the copy is incomplete or the "
            f"save did not finish; {RECOPY}."
        )


def _unreadable(exc: OSError) -> ModelError:
    return ModelError(
        f"{exc.filename}: cannot be read ({exc.strerror or exc}); check that the file exists and "
        "its permissions let this user read it."
    )


@contextmanager
def reading(what: str, source: str | os.PathLike) -> Iterator[None]:
    """Turn an error raised while transformers or peft read ``source`` into a :class:`ModelError`.

    The checks above run first; whatever still goes wrong inside ``from_pretrained`` comes from a
    folder they cannot fully judge, with an exception type that depends on where transformers'
    code stumbled (a config whose sizes do not fit the weights, zero attention heads, a cut
    tokenizer file), so every ``Exception`` is caught here and its message kept. Running out of
    memory is not a folder problem and passes through unchanged.

    Args:
        what: what is being read, e.g. ``"the model weights"``.
        source: the folder (or file) being read.
    """
    try:
        yield
    except (ModelError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        from transformers import __version__

        raise ModelError(
            f"could not load {what} from {source}: {type(exc).__name__}: {str(exc).strip()}\n"
            "The folder is incomplete or damaged, or was saved by a transformers release that "
            f"this one ({__version__}) cannot read; {RECOPY}."
        ) from exc
