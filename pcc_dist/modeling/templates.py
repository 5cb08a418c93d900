"""Prompt templates: the paper's PromptEOL / PromptSUM / PromptSTH and custom ``{s}`` strings."""

from __future__ import annotations

from pcc_dist.modeling._core import ModelError

TEMPLATES: dict[str, str] = {
    "PromptEOL": 'This sentence : "{s}" means in one word:"',
    "PromptSUM": 'This sentence : "{s}" can be summarized as',
    "PromptSTH": 'This sentence : "{s}" means something',
}
"""Prompt templates of the paper, exact text; ``{s}`` is replaced by the sentence."""

DEFAULT_DECODER_TEMPLATE = "PromptEOL"


def resolve_template(template: str | None, kind: str) -> str | None:
    """Return the template string to render, or None for "no prompt".

    Args:
        template: None (decoder → PromptEOL, encoder → no prompt), a template name from
            :data:`TEMPLATES`, or a custom string containing ``{s}`` exactly once.
        kind: ``"encoder"`` or ``"decoder"``.

    Raises:
        ModelError: unknown template name, or a custom template without exactly one ``{s}``.
    """
    if template is None:
        return TEMPLATES[DEFAULT_DECODER_TEMPLATE] if kind == "decoder" else None
    if template in TEMPLATES:
        return TEMPLATES[template]
    count = template.count("{s}")
    if count == 0:
        looks_like_name = template.isidentifier()
        what = "unknown template name" if looks_like_name else "template without '{s}'"
        raise ModelError(
            f"model.template={template!r}: {what}. Use one of {sorted(TEMPLATES)} or a custom "
            "string containing the placeholder {s} exactly once, e.g. "
            '\'This sentence : "{s}" means in one word:"\'.'
        )
    if count > 1:
        raise ModelError(
            f"model.template={template!r} contains '{{s}}' {count} times; the sentence placeholder "
            "must appear exactly once (truncation cuts the one sentence span)."
        )
    return template
