"""The :class:`Embedder`: prompt rendering, truncation inside the template, padding, pooling.

How decoders and encoders are embedded and how ``max_length`` counts tokens is described in the
:mod:`pcc_dist.modeling` package docstring.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pcc_dist.modeling._core import ModelError, _base_config, _check_choice
from pcc_dist.modeling.pooling import pool, resolve_pooling
from pcc_dist.modeling.templates import TEMPLATES, resolve_template
from pcc_dist.progress import progress

logger = logging.getLogger(__name__)
# A step's views are tokenised ahead in a thread (pcc_dist.step_inputs) while the main thread may
# tokenise dev sentences; a Rust tokenizer borrowed by two threads at once can fail with
# "Already borrowed", so calls into one are serialised (the step's own work overlaps them).
_TOKENIZER_LOCK = threading.Lock()


class Embedder(nn.Module):
    """A backbone plus the text preprocessing and pooling that turn sentences into embeddings.

    Args:
        backbone: a Hugging Face base model (``AutoModel``, no LM head), possibly peft-wrapped.
        tokenizer: its tokenizer (a fast tokenizer: offsets are needed to truncate inside a
            template).
        kind: ``"encoder"`` or ``"decoder"``.
        pooling: ``"mean"``, ``"cls"`` or ``"last"`` (validated against ``kind``; ``"auto"``
            resolved).
        template: a template name, a custom string with ``{s}``, or None (decoder → PromptEOL).
        max_length: maximum number of **sentence** tokens (the template and special tokens come on
            top).
        spec: how the model was built (mode, base model, dtype, quantisation, LoRA settings);
            written to run folders by :func:`save_embedder`.

    Attributes:
        backbone, tokenizer, kind, pooling, template (the rendered template string or None),
        max_length.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        *,
        kind: str,
        pooling: str = "auto",
        template: str | None = None,
        max_length: int = 64,
        spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_choice("model.kind", kind, ("encoder", "decoder"))
        if not isinstance(max_length, int) or max_length < 1:
            raise ModelError(f"model.max_length={max_length!r} must be a positive integer.")
        if not getattr(tokenizer, "is_fast", False):
            raise ModelError(
                f"tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer; truncating "
                "the sentence inside a template needs character offsets. Provide a tokenizer.json."
            )
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.kind = kind
        self.pooling = resolve_pooling(pooling, kind)
        self.template = resolve_template(template, kind)
        self.template_name = next((k for k, v in TEMPLATES.items() if v == self.template), None)
        self.max_length = max_length
        self.spec: dict[str, Any] = dict(spec or {})
        # Decoders pad on the left so the last position is always the real last token; positions are
        # rebuilt from the mask in forward(), which makes the padding side invisible to the model.
        tokenizer.padding_side = "left" if kind == "decoder" else "right"
        self.pad_token_id = self._pad_id(tokenizer)
        self.special_prefix, self.special_suffix = self._special_tokens(tokenizer, kind)

    # -- tokenisation -----------------------------------------------------------------------------

    @staticmethod
    def _pad_id(tokenizer: Any) -> int:
        # Many LLM tokenizers have no pad token; padded positions are masked out, so any id works.
        for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
            value = getattr(tokenizer, attr, None)
            if value is not None:
                return int(value)
        return 0

    @staticmethod
    def _special_tokens(tokenizer: Any, kind: str) -> tuple[list[int], list[int]]:
        """The special ids the tokenizer puts before/after a text ([CLS]/[SEP], BOS, ...).

        Found by tokenising a probe with and without special tokens. For decoders a trailing special
        token (an EOS some tokenizers append) is dropped: the embedding must be the hidden state of
        the prompt's last token, not of an EOS.
        """
        probe = "hello world"
        with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        for start in range(len(with_special) - len(plain) + 1):
            if with_special[start : start + len(plain)] == plain:
                prefix, suffix = with_special[:start], with_special[start + len(plain) :]
                break
        else:
            logger.warning("could not locate the tokenizer's special tokens; adding none")
            prefix, suffix = [], []
        if kind == "decoder" and suffix:
            logger.info(
                "decoder: dropping the tokenizer's trailing special tokens %s (no EOS appended)",
                suffix,
            )
            suffix = []
        return list(prefix), list(suffix)

    def render(self, sentence: str) -> str:
        """Put one sentence into the template (identity without a template)."""
        if self.template is None:
            return sentence
        return self.template.replace("{s}", sentence)

    def token_ids(self, sentences: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids of each rendered sentence, unpadded, the sentence cut to ``max_length`` tokens.

        The whole rendered string is tokenised in one piece, so tokens at the template boundary are
        the ones the model sees everywhere (training, evaluation, the sentence-transformers export).
        A sentence longer than ``max_length`` tokens is cut at the end of its ``max_length``-th
        token **as text**, put back into the template and tokenised again: the template suffix (e.g.
        ``means in one word:"``) survives whole, including a closing quote that a BPE merges with
        the sentence's last characters. Without a template the tokens are simply cut. Special tokens
        (BOS, [CLS]/[SEP]) come from the tokenizer; a decoder never gets a trailing EOS.
        """
        limit = self.max_length if max_length is None else max_length
        if not isinstance(limit, int) or limit < 1:
            raise ModelError(f"max_length={limit!r} must be a positive integer.")
        if isinstance(sentences, str):
            raise TypeError("token_ids() takes a list of sentences, not a single string")
        sentences = list(sentences)
        texts = [self.render(s) for s in sentences]
        # verbose=False: sequences longer than model_max_length are expected here (cut below).
        with _TOKENIZER_LOCK:
            enc = self.tokenizer(
                texts,
                add_special_tokens=False,
                return_attention_mask=False,
                return_offsets_mapping=self.template is not None,
                verbose=False,
            )
        ids_list: list[list[int]] = enc["input_ids"]
        start = len(self.template.split("{s}", 1)[0]) if self.template is not None else 0
        redo: list[int] = []
        for i, ids in enumerate(ids_list):
            # Only a sequence longer than the limit can hold more than `limit` sentence tokens.
            if len(ids) <= limit:
                continue
            if self.template is None:
                # No template: plain right truncation of the tokens, as every HF tokenizer does it.
                ids_list[i] = ids[:limit]
                continue
            end = start + len(sentences[i])
            # A token belongs to the sentence when its character span overlaps [start, end).
            inside = [
                (a, b) for a, b in enc["offset_mapping"][i] if b > a and a < end and b > start
            ]
            if len(inside) > limit:
                sentences[i] = sentences[i][: min(inside[limit - 1][1], end) - start]
                redo.append(i)
        if redo:
            with _TOKENIZER_LOCK:
                again = self.tokenizer(
                    [self.render(sentences[i]) for i in redo],
                    add_special_tokens=False,
                    return_attention_mask=False,
                    verbose=False,
                )["input_ids"]
            for i, ids in zip(redo, again, strict=True):
                ids_list[i] = ids
        return [self.special_prefix + ids + self.special_suffix for ids in ids_list]

    def overhead_tokens(
        self, probes: Sequence[str] = ("A man is playing a guitar", "0", "Two dogs .")
    ) -> int:
        """Tokens a rendered sentence carries besides its own: special tokens plus the template.

        Counted on probe sentences (the most over them) because a template tokenised with an empty
        sentence can merge its quotes into one token.
        """
        start = len(self.template.split("{s}", 1)[0]) if self.template is not None else 0
        texts = [self.render(p) for p in probes]
        enc = self.tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        most = 0
        for probe, offsets in zip(probes, enc["offset_mapping"], strict=True):
            end = start + len(probe)
            inside = sum(1 for a, b in offsets if b > a and a < end and b > start)
            most = max(most, len(offsets) - inside)
        return most + len(self.special_prefix) + len(self.special_suffix)

    def collate(self, ids_list: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        """Pad token-id lists into a batch (left for decoders, right for encoders).

        Shape:
            returns ``input_ids`` and ``attention_mask``, both ``[B, L]`` int64, L = longest
            sequence.
        """
        width = max(len(ids) for ids in ids_list)
        input_ids = torch.full((len(ids_list), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids_list), width), dtype=torch.long)
        left = self.kind == "decoder"
        for row, ids in enumerate(ids_list):
            n = len(ids)
            cols = slice(width - n, width) if left else slice(0, n)
            input_ids[row, cols] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, cols] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def tokenize(
        self, sentences: Sequence[str], max_length: int | None = None
    ) -> dict[str, Tensor]:
        """Render the template, tokenise, cut each sentence to ``max_length`` tokens, pad.

        The template suffix always survives truncation (see :meth:`token_ids`).

        Shape:
            returns ``input_ids`` and ``attention_mask``, both ``[B, L]`` int64.
        """
        return self.collate(self.token_ids(sentences, max_length))

    # -- model ------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def embedding_dim(self) -> int:
        return int(_base_config(self.backbone).hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        """Embed a tokenised batch.

        Decoders: the final hidden state of the last real token. Positions are
        ``cumsum(mask) - 1`` so that left padding does not shift learned absolute positions
        (transformers otherwise numbers the padded row from 0 at its first pad; rotary positions are
        shift-invariant, OPT's learned ones are not). Encoders: mask-aware mean of the last hidden
        states, or the first ([CLS]) token.

        Args:
            input_ids: token ids from :meth:`tokenize`.
            attention_mask: 1 for real tokens, 0 for padding.
            **kwargs: passed to the backbone.

        Shape:
            input_ids, attention_mask: ``[B, L]``; returns ``[B, D]`` raw (un-normalised)
            embeddings in the backbone's dtype.
        """
        if self.kind == "decoder":
            kwargs.setdefault("position_ids", (attention_mask.long().cumsum(-1) - 1).clamp(min=0))
            kwargs.setdefault("use_cache", False)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # [B, L, D]
        return pool(hidden, attention_mask, self.pooling)

    @torch.no_grad()
    def encode(
        self,
        sentences: Sequence[str],
        batch_size: int = 64,
        show_progress: bool = False,
        max_length: int | None = None,
    ) -> Tensor:
        """Embed sentences in length-sorted batches (dynamic padding), in eval mode.

        All sentences are tokenised in one call, sorted longest first (so an out-of-memory error
        shows at the first batch), padded per batch only to that batch's longest sequence, and
        written back in input order. The module's train/eval mode is restored afterwards.

        Shape:
            returns ``[n, D]`` float32 on CPU, row i = sentence i.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        sentences = list(sentences)
        out = torch.empty((len(sentences), self.embedding_dim), dtype=torch.float32)
        if not sentences:
            return out
        ids_list = self.token_ids(sentences, max_length)
        order = sorted(range(len(ids_list)), key=lambda i: -len(ids_list[i]))
        device = self.device
        was_training = self.training
        self.eval()
        try:
            with progress(len(order), "embed", "sent", show_progress) as bar:
                for start in range(0, len(order), batch_size):
                    idx = order[start : start + batch_size]
                    batch = self.collate([ids_list[i] for i in idx])
                    emb = self(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                    out[torch.as_tensor(idx)] = emb.float().cpu()
                    bar.update(len(idx))
        finally:
            self.train(was_training)
        return out
