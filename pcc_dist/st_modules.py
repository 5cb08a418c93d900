"""The sentence-transformers side of ``pcc-export --format sentence-transformers``.

The folder is assembled from sentence-transformers' own modules and written by its own
``SentenceTransformer.save()``, so its files are whatever the installed release writes and reads
(no hand-written copies of its JSON formats):

* ``Transformer`` over the merged model folder (its tokenizer already carries the prompt
  as a chat template, see :mod:`pcc_dist.export`), with the ``message`` modality for prompted
  models: sentence-transformers then renders every text through that template.
* ``Pooling``: ``lasttoken`` for decoders, ``mean``/``cls`` for encoders, the prompt
  included (it is part of what the model read).
* No ``Normalize``: pcc_dist embeddings are raw; the similarity is cosine either way.
* ``prompts`` stays empty and ``default_prompt_name`` None: a sentence-transformers prompt is a
  text *prefix*, while all three paper templates wrap the sentence (PromptEOL ends in
  ``means in one word:"``), and a prefix-only prompt would also make the plain-text path append
  the tokenizer's trailing special tokens that pcc_dist drops. The chat template reproduces our
  token ids exactly (checked on probe sentences at export).

The chat template itself (:func:`chat_template_for`) and its check against our token ids
(:func:`check_chat_template`) are here too. sentence-transformers is an optional extra
(``pcc-dist[st]``), imported here only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcc_dist.export_target import ExportError
from pcc_dist.modeling import ModelError

if TYPE_CHECKING:
    from pcc_dist.modeling import Embedder

_POOLING = {"last": "lasttoken", "mean": "mean", "cls": "cls"}

# Probe sentences for the chat-template check: quotes, punctuation, digits and spacing, the places
# where tokenising the template and the sentence together could differ.
PROBES = (
    "A man is playing a guitar.",
    'She said "hi" twice , then left .',
    "  leading and trailing spaces  ",
    "3.5 % of 1,000 people (roughly) agree!",
    "",
)


def chat_template_for(embedder: Embedder) -> str:
    """A Jinja chat template: the tokenizer's leading special tokens, then the prompt around a text.

    sentence-transformers passes each text as one user message; the content may be a string ("flat"
    format) or a list of typed parts ("structured"), so both are accepted. Literals go through
    ``json.dumps`` to be valid Jinja string literals whatever the template contains.
    """
    if embedder.template is None:
        raise ExportError("chat_template_for() needs a prompt template")
    prefix, suffix = embedder.template.split("{s}", 1)
    specials = "".join(embedder.tokenizer.convert_ids_to_tokens(embedder.special_prefix))
    trailing = "".join(embedder.tokenizer.convert_ids_to_tokens(embedder.special_suffix))
    lit = lambda text: json.dumps(text, ensure_ascii=False)  # noqa: E731
    return (
        "{%- set c = messages[-1]['content'] -%}"
        "{%- if c is not string -%}"
        "{%- set c = c | map(attribute='text') | join('') -%}"
        "{%- endif -%}"
        f"{{{{ {lit(specials + prefix)} }}}}{{{{ c }}}}{{{{ {lit(suffix + trailing)} }}}}"
    )


def check_chat_template(embedder: Embedder, tokenizer: Any) -> None:
    """The chat-template rendering must give exactly the ids :meth:`Embedder.token_ids` gives."""
    big = 10**6  # no truncation: this compares the rendering, not the cut
    for probe in PROBES:
        ours = embedder.token_ids([probe], max_length=big)[0]
        theirs = tokenizer.apply_chat_template(
            [{"role": "user", "content": probe}], tokenize=True, return_dict=True
        )
        if list(theirs["input_ids"]) != ours:
            raise ExportError(
                "the sentence-transformers chat template does not reproduce pcc_dist's tokens "
                f"for {probe!r}: "
                f"{tokenizer.convert_ids_to_tokens(list(theirs['input_ids']))} vs "
                f"{tokenizer.convert_ids_to_tokens(ours)}. This tokenizer re-tokenises its special "
                "tokens differently inside text; export --format merged and embed with pcc_dist "
                "instead."
            )



def import_sentence_transformers() -> tuple[Any, Any, Any]:
    """``(SentenceTransformer, Transformer, Pooling)``, or an error naming the extra to install.

    The 6.x module paths (``sentence_transformers.models`` is deprecated there).
    """
    try:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError as exc:
        raise ExportError("a sentence-transformers export needs sentence-transformers>=6: "
                          "pip install 'pcc-dist[st]'.") from exc
    return SentenceTransformer, Transformer, Pooling


def build_sentence_transformer(folder: Path, *, pooling: str, prompted: bool,
                               max_seq_length: int, device: str = "cpu") -> Any:
    """A ``SentenceTransformer`` of ``Transformer(folder)`` + ``Pooling``.

    Args:
        folder: The merged model folder (weights, config, tokenizer with its chat template).
        pooling: pcc_dist pooling (``last``, ``mean``, ``cls``).
        prompted: The tokenizer's chat template carries a prompt (``message`` modality).
        max_seq_length: Token limit: our sentence limit + the prompt/special-token overhead.
        device: Where sentence-transformers loads the model for the save.
    """
    sentence_transformer, transformer_module, pooling_module = import_sentence_transformers()
    options: dict[str, Any] = {"max_seq_length": max_seq_length,
                               "transformer_task": "feature-extraction"}
    if prompted:
        forward = {"method": "forward", "method_output_name": "last_hidden_state"}
        options.update(modality_config={"text": dict(forward),
                                        "message": {**forward, "format": "flat"}},
                       module_output_name="token_embeddings")
    try:
        transformer = transformer_module(str(folder), **options)
    except (OSError, ValueError) as exc:
        raise ModelError(f"sentence-transformers cannot load the merged model in {folder}: "
                         f"{exc}") from exc
    dim = transformer.get_embedding_dimension()
    pool = pooling_module(dim, pooling_mode=_POOLING[pooling], include_prompt=True)
    return sentence_transformer(modules=[transformer, pool], device=device,
                                similarity_fn_name="cosine")


def save_sentence_transformer(folder: Path, *, pooling: str, prompted: bool,
                              max_seq_length: int) -> None:
    """Build the model (see :func:`build_sentence_transformer`) and ``save()`` it into ``folder``
    (over the merged model it was read from: the same weights and tokenizer), without
    sentence-transformers' generic model card (pcc_dist writes its own README.md)."""
    model = build_sentence_transformer(folder, pooling=pooling, prompted=prompted,
                                       max_seq_length=max_seq_length)
    model.save(str(folder), create_model_card=False)
