"""The sentence-transformers side of ``train_throughput.py``: ``SentenceTransformerTrainer`` with
one of four losses on the same examples, batch, max length and learning rate as our side.

* stage 2 (scored pairs): ``CosineSimilarityLoss`` (``"cosine"``) or ``CoSENTLoss``
  (``"cosent"``), columns ``sentence1, sentence2, score``;
* stage 1 (NLI triplets with hard negatives): ``MultipleNegativesRankingLoss`` (``"mnrl"``) or
  ``CachedMultipleNegativesRankingLoss`` (``"cmnrl"``, mini-batches of ``CMNRL_MINI_BATCH``),
  columns ``anchor, positive, negative``: in-batch negatives plus the hard negative, like our
  InfoNCE.

The time of a step is split by wrapped-method timers: data loading + collation (between steps),
model forward, the loss (its own code, model forwards taken out), backward, and the rest (the
optimizer step). The cached loss runs its forwards and backward inside its own ``forward``, so
there "loss" holds them.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

ST_LOSSES = {"cosine": ("stage2", "CosineSimilarityLoss"), "cosent": ("stage2", "CoSENTLoss"),
             "mnrl": ("stage1", "MultipleNegativesRankingLoss"),
             "cmnrl": ("stage1", "CachedMultipleNegativesRankingLoss")}
# sentence-transformers' default mini-batch of the cached loss.
CMNRL_MINI_BATCH = 32


def st_columns(examples: list, stage: str) -> dict[str, list]:
    """Our examples as the trainer's dataset columns (a hard negative is required in stage 1)."""
    if stage == "stage2":
        return {"sentence1": [p.sentence1 for p in examples],
                "sentence2": [p.sentence2 for p in examples],
                "score": [float(p.score) for p in examples]}
    kept = [t for t in examples if t.hard_negative]
    return {"anchor": [t.anchor for t in kept], "positive": [t.positive for t in kept],
            "negative": [t.hard_negative for t in kept]}


def _make_loss(name: str, model: Any) -> Any:
    from sentence_transformers.sentence_transformer import losses

    cls = getattr(losses, ST_LOSSES[name][1])
    if name == "cmnrl":
        return cls(model, mini_batch_size=CMNRL_MINI_BATCH)
    return cls(model)


def run_theirs(loss_name: str, model_path: str, examples: list, *, batch: int, max_length: int,
               lr: float, steps: int, warmup: int, workdir: Path, seed: int,
               timers: Any, breakdown: Any) -> dict[str, Any]:
    """``SentenceTransformerTrainer`` + the named loss; time the ``steps`` after ``warmup``.

    ``timers`` is a fresh ``train_throughput.Timers``; ``breakdown(seconds, window, steps)`` the
    shared per-part formatter (passed in so this module does not import the script).
    """
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from transformers import TrainerCallback

    stage = ST_LOSSES[loss_name][0]
    stamps: list[float] = []
    cpu_stamps: list[float] = []
    marks: dict[str, float] = {}
    tokens: dict[str, list[int]] = {"padded": [], "real": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if "end" in marks:
                timers.seconds["data_loading_collate"] += now - marks["end"]
            marks["begin"] = now

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            stamps.append(now)
            cpu_stamps.append(time.process_time())
            marks["end"] = now
            if state.global_step == warmup:
                timers.reset()

    model = SentenceTransformer(model_path, device="cpu")
    model.max_seq_length = max_length
    loss = _make_loss(loss_name, model)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(workdir / f"st_{time.monotonic_ns()}"), per_device_train_batch_size=batch,
        max_steps=warmup + steps, learning_rate=lr, warmup_steps=8, save_strategy="no",
        report_to="none", dataloader_drop_last=True, use_cpu=True, seed=seed,
        disable_tqdm=True, dataloader_num_workers=0)
    trainer = SentenceTransformerTrainer(model=model, args=args,
                                         train_dataset=Dataset.from_dict(st_columns(examples,
                                                                                    stage)),
                                         loss=loss, callbacks=[Clock()])
    model_cls = type(model)
    original_forward = model_cls.forward

    def counting_forward(self, features, *a, **k):
        if "attention_mask" in features and len(stamps) >= warmup:
            tokens["padded"].append(int(features["attention_mask"].numel()))
            tokens["real"].append(int(features["attention_mask"].sum()))
        return original_forward(self, features, *a, **k)

    model_cls.forward = counting_forward
    try:
        with timers.patch(model_cls, "forward", "forward"), \
                timers.patch(type(loss), "forward", "_loss_incl_forward"), \
                timers.patch(type(trainer), "training_step", "_training_step"):
            trainer.train()
    finally:
        model_cls.forward = original_forward
    window = stamps[warmup + steps - 1] - stamps[warmup - 1]
    cpu = cpu_stamps[warmup + steps - 1] - cpu_stamps[warmup - 1]
    s = dict(timers.seconds)
    # Nested timers -> exclusive parts: loss (minus the model forwards inside it), backward
    # (training step minus the loss), optimizer step = the rest of the step.
    loss_total = s.pop("_loss_incl_forward", 0.0)
    step_total = s.pop("_training_step", 0.0)
    seconds = {"data_loading_collate": s.get("data_loading_collate", 0.0),
               "forward": s.get("forward", 0.0),
               "loss": max(0.0, loss_total - s.get("forward", 0.0)),
               "backward": max(0.0, step_total - loss_total)}
    n_params = sum(p.numel() for p in model.parameters())
    del trainer, model
    gc.collect()
    return {"stage": stage, "loss": ST_LOSSES[loss_name][1], "steps": steps, "warmup": warmup,
            "seconds": window, "n_params": n_params, "pairs_per_second": steps * batch / window,
            "steps_per_second": steps / window, "cpu_seconds": cpu,
            "pairs_per_cpu_second": steps * batch / cpu,
            "breakdown": breakdown(seconds, window, steps),
            "padded_tokens_per_step": sum(tokens["padded"]) / max(1, steps),
            "real_tokens_per_step": sum(tokens["real"]) / max(1, steps)}
