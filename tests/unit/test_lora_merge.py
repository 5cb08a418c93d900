"""A LoRA run folder loaded for evaluation has its adapters merged (W + (alpha/r) B A) and embeds
like the unmerged peft model up to float rounding; for training it keeps the peft layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.tiny_models import model_config, save_tiny_model

from pcc_dist.modeling import load_embedder, load_embedder_from_run, save_embedder  # noqa: E402

SENTENCES = ["A man is playing a guitar.", "Two dogs run on the beach.", "A woman slices an onion.",
             "Nobody is here.", "The cat sleeps on a warm red sofa near the window."]


def _lora_modules(model: torch.nn.Module) -> int:
    return sum(1 for name, _ in model.named_modules() if name.endswith("lora_A"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A LoRA run folder whose adapters are non-zero (B = 0 after init would make merging a
    no-op that any bug passes)."""
    pytest.importorskip("peft")
    tmp = tmp_path_factory.mktemp("lora_merge")
    base = save_tiny_model(tmp / "llama", "llama", causal_lm=True)
    emb = load_embedder(model_config(name_or_path=str(base), mode="lora",
                                     lora={"r": 4, "alpha": 8, "dropout": 0.1}),
                        for_training=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in emb.backbone.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return save_embedder(emb, tmp / "run")


def test_merged_evaluation_embeds_like_the_unmerged_adapters(lora_run):
    merged = load_embedder_from_run(lora_run)
    unmerged = load_embedder_from_run(lora_run, merge_lora=False)
    # Merged: no LoRA layer left; unmerged: one per adapted linear layer (2 layers x 7).
    assert _lora_modules(merged.backbone) == 0 and _lora_modules(unmerged.backbone) == 14
    a, b = merged.encode(SENTENCES), unmerged.encode(SENTENCES)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert float(cosine.min()) >= 0.9999, cosine
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)

    # Negative control: the base without the adapters is far from both, so the comparison above
    # can tell a merge that dropped (or mis-scaled) the adapters.
    base = load_embedder_from_run(lora_run, merge_lora=False)
    with base.backbone.disable_adapter():
        plain = base.encode(SENTENCES)
    control = torch.nn.functional.cosine_similarity(a, plain, dim=-1)
    assert float(control.min()) < 0.99, control


def test_training_loads_keep_the_peft_adapters(lora_run):
    resumed = load_embedder_from_run(lora_run, for_training=True)
    assert _lora_modules(resumed.backbone) == 14
    assert any(p.requires_grad for n, p in resumed.named_parameters() if "lora_" in n)
