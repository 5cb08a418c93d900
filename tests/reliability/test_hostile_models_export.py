"""Hostile model folders and export targets (issue #19): a clear error or a safe fallback.

The contract under test, through the real console scripts run as subprocesses:

* A model folder given to ``pcc-eval --model``, ``pcc-train model.name_or_path=`` or
  ``pcc-export`` that is empty, holds a truncated or invalid ``config.json``, a truncated
  ``model.safetensors`` or an unknown ``model_type`` ends the command with a non-zero exit code,
  no traceback, and a message naming the folder or file, what is wrong and the fix.
* A training run folder (``run.output_dir``) stands for its ``model/``; one whose training has not
  written ``model/`` yet is an error naming its newest checkpoint.
* An export never writes into the folder it reads (nor inside it, nor into one containing it),
  never into a training run folder, and never into a non-empty folder without ``--overwrite``; a
  refused export leaves every source file byte-identical. With ``--overwrite`` the target is
  replaced only once the new export is complete: an export that fails half-way leaves the old
  target as it was and no temporary folder behind.

A Hypothesis property damages a tiny model's files at random offsets (truncation, a replaced byte)
and asserts that loading either works (a changed byte inside tensor data cannot be detected
without checksums) or raises :class:`~pcc_dist.modeling.ModelError` naming the folder, never any
other exception.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.runs import BIN, CONFIG, ROOT, env
from helpers.tiny_models import model_config, save_tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from pcc_dist.checkpoint import COMPLETE_MARKER
from pcc_dist.modeling import (
    TRAINING_CONFIG_NAME,
    TRAINING_MODEL_DIR,
    ModelError,
    load_embedder,
    save_embedder,
)

PROFILE = settings.get_profile("pcc-reliability")
# Every example copies and tries to load a tiny model (0.05-0.5 s on 2 shared cores).
DAMAGE = settings(PROFILE, max_examples=40)
TIMEOUT = 300
EVAL_ARGS = ("--tasks", "STSBenchmark", "--batch-size", "4")
RECOPY = "copy the folder again"

# A handful of STS-B test rows in the real file's layout (genre, file, year, id, score, s1, s2),
# so that pcc-eval gets past its data and reaches the model.
STSB_ROWS = [
    ("a man plays guitar .", "a man is playing a guitar .", 4.8),
    ("the dog runs fast .", "a cat eats food .", 0.4),
    ("two people sitting near a tree .", "people are sitting near the tree .", 4.0),
    ("a child plays soccer in the park .", "a woman is eating .", 0.8),
    ("the red ball is big .", "a big red ball .", 3.6),
]


# -- building model, run and data folders ---------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random Llama, the base model of the LoRA run."""
    return save_tiny_model(tmp_path_factory.mktemp("base") / "llama", "llama")


@pytest.fixture(scope="module")
def run_model(tmp_path_factory, base) -> Path:
    """A LoRA run folder (``pcc_embedder.json`` + ``adapter/`` + tokenizer) over ``base``."""
    cfg = model_config(name_or_path=str(base), mode="lora", max_length=8, lora={"r": 4})
    return save_embedder(load_embedder(cfg), tmp_path_factory.mktemp("lora") / "run")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    folder = root / "sts" / "STSBenchmark"
    folder.mkdir(parents=True)
    lines = [
        f"main-captions\tMSRvid\t2012test\t{i:04d}\t{score:.3f}\t{a}\t{b}"
        for i, (a, b, score) in enumerate(STSB_ROWS)
    ]
    (folder / "sts-test.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def training_run(root: Path, run_model: Path | None, checkpoints: dict[str, bool]) -> Path:
    """A ``pcc-train`` output folder: ``config.yaml``, checkpoints and, when given, ``model/``.

    Args:
        root: the folder to create.
        run_model: copied to ``model/`` (None: training has not finished).
        checkpoints: ``"stage/step-…"`` -> whether the checkpoint is complete.
    """
    root.mkdir(parents=True)
    (root / TRAINING_CONFIG_NAME).write_text(f"run:\n  output_dir: {root}\n", encoding="utf-8")
    for name, complete in checkpoints.items():
        stage, step = name.split("/")
        folder = root / stage / "checkpoints" / step
        folder.mkdir(parents=True)
        if complete:
            (folder / COMPLETE_MARKER).write_text("")
    if run_model is not None:
        shutil.copytree(run_model, root / TRAINING_MODEL_DIR)
    return root


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), to prove nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Temporary export folders (``.<name>.tmp-…`` / ``.old-…``) left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# -- running the console scripts ------------------------------------------------------------------


def cli(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``.venv/bin/<name> args`` to the end; stdout and stderr are captured separately."""
    return subprocess.run(
        [str(BIN / name), *args],
        cwd=ROOT,
        env=env(HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def assert_clear_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code != 0, no traceback anywhere, and every needle in stderr."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


def damaged_model(tmp_path: Path, base: Path, damage: str) -> tuple[Path, list[str]]:
    """A copy of ``base`` with one damage; returns it and what the error must mention."""
    folder = tmp_path / "model"
    if damage == "empty folder":
        folder.mkdir()
        return folder, [str(folder), "is empty", "the folder a model was saved in"]
    shutil.copytree(base, folder)
    config, weights = folder / "config.json", folder / "model.safetensors"
    if damage == "truncated config.json":
        truncate(config, config.stat().st_size // 2)
        return folder, [str(config), "not valid JSON", "truncated", RECOPY]
    if damage == "truncated model.safetensors":
        truncate(weights, weights.stat().st_size // 3)
        return folder, [str(weights), "bytes of tensor data", "truncated", RECOPY]
    assert damage == "unknown model_type"
    config.write_text(config.read_text().replace('"llama"', '"llama-from-the-future"'))
    return folder, [str(config), "model_type='llama-from-the-future'", "trust_remote_code"]


DAMAGES = [
    "empty folder",
    "truncated config.json",
    "truncated model.safetensors",
    "unknown model_type",
]


# -- model folders --------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGES)
def test_eval_damaged_model_folder_is_a_clear_error(tmp_path, base, data_root, damage):
    folder, needles = damaged_model(tmp_path, base, damage)
    proc = cli("pcc-eval", "--model", str(folder), "--data-root", str(data_root), *EVAL_ARGS)
    assert_clear_error(proc, "pcc-eval: model error:", *needles)


def test_train_damaged_model_folder_is_a_clear_error(tmp_path, base):
    folder, needles = damaged_model(tmp_path, base, "truncated model.safetensors")
    proc = cli(
        "pcc-train", "--config", str(CONFIG), f"model.name_or_path={folder}",
        f"run.output_dir={tmp_path / 'run'}", "stage1.enabled=false", "stage2.max_steps=1",
        "data.decontaminate=false", "eval.tasks=[]",
    )
    assert_clear_error(proc, *needles)


def test_export_damaged_run_folder_is_a_clear_error(tmp_path, run_model):
    run = shutil.copytree(run_model, tmp_path / "run")
    weights = run / "adapter" / "adapter_model.safetensors"
    truncate(weights, 100)
    proc = cli("pcc-export", str(run), str(tmp_path / "out"), "--format", "merged")
    assert_clear_error(proc, str(weights), "truncated", RECOPY)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# -- training run folders -------------------------------------------------------------------------


def test_eval_training_run_folder_uses_its_model(tmp_path, run_model, data_root):
    run = training_run(tmp_path / "run", run_model, {"stage2/step-00000004": True})
    proc = cli("pcc-eval", "--model", str(run), "--data-root", str(data_root), *EVAL_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{run} is a training run folder: using its final model {run / 'model'}" in proc.stderr
    assert "1 task(s), 5 pairs" in proc.stdout


def test_unfinished_training_run_names_its_newest_checkpoint(tmp_path, data_root):
    run = training_run(
        tmp_path / "run",
        None,
        {
            "stage1/step-00000008": True,
            "stage2/step-00000002": True,
            "stage2/step-00000004": True,
            "stage2/step-00000006": False,  # a write that died: not a checkpoint
        },
    )
    newest = run / "stage2" / "checkpoints" / "step-00000004"
    needles = [f"{run} is a training run folder without a complete model/", str(newest), "resume"]
    proc = cli("pcc-eval", "--model", str(run), "--data-root", str(data_root), *EVAL_ARGS)
    assert_clear_error(proc, *needles)
    proc = cli("pcc-export", str(run), str(tmp_path / "out"), "--format", "adapter")
    assert_clear_error(proc, *needles)


# -- export targets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        ("model", "is the folder this export reads"),
        ("model/exported", "is inside the folder this export reads"),
        (".", "contains the folder this export reads"),
        ("../other_run", "is a training run folder"),
    ],
)
def test_export_refuses_targets_that_would_destroy_files(tmp_path, run_model, target, needle):
    run = training_run(tmp_path / "run", run_model, {"stage2/step-00000004": True})
    training_run(tmp_path / "other_run", run_model, {})
    before = snapshot(tmp_path)
    out = run / target
    proc = cli("pcc-export", str(run / "model"), str(out), "--format", "merged", "--overwrite")
    assert_clear_error(proc, "pcc-export: target", str(out), needle)
    assert snapshot(tmp_path) == before
    assert leftovers(run) == [] and leftovers(tmp_path) == []


def test_export_into_a_non_empty_folder_needs_overwrite(tmp_path, run_model):
    run = training_run(tmp_path / "run", run_model, {})
    out = tmp_path / "exports" / "adapter"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("keep me unless told otherwise")
    proc = cli("pcc-export", str(run), str(out), "--format", "adapter")
    assert_clear_error(proc, str(out), "not empty", "--overwrite")
    assert snapshot(out) == {"notes.txt": b"keep me unless told otherwise"}

    # Negative control: with --overwrite the old folder is replaced, whole, by the export (and a
    # training run folder given as the source is read through its model/).
    proc = cli("pcc-export", str(run), str(out), "--format", "adapter", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "using its final model" in proc.stderr
    files = set(snapshot(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "pcc_embedder.json"} <= files
    assert "notes.txt" not in files
    assert leftovers(out.parent) == []


def test_failed_overwrite_keeps_the_old_target(tmp_path, run_model):
    run = shutil.copytree(run_model, tmp_path / "run")
    # The tokenizer is read after the merged weights are written: the export fails half-way.
    truncate(run / "tokenizer.json", 50)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    proc = cli("pcc-export", str(run), str(out), "--format", "merged", "--overwrite")
    assert_clear_error(proc, f"could not load the tokenizer from {run}", "JSONDecodeError")
    assert snapshot(out) == {"config.json": b'{"old": true}'}
    assert leftovers(tmp_path) == []


def test_valid_export_into_a_new_folder_succeeds(tmp_path, run_model):
    """Negative control for the refusals above: the same source exports into a new folder."""
    before = snapshot(run_model)
    out = tmp_path / "new" / "merged"
    proc = cli("pcc-export", str(run_model), str(out), "--format", "merged")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"config.json", "model.safetensors", "pcc_embedder.json"} <= set(snapshot(out))
    assert snapshot(run_model) == before
    assert leftovers(out.parent) == []


# -- property: random damage ends in a ModelError or a load ----------------------------------------


@st.composite
def damage(draw) -> tuple[str, str, float, int]:
    """(file, "truncate" | "replace", relative offset, byte)."""
    name = draw(st.sampled_from(["config.json", "model.safetensors", "tokenizer.json"]))
    how = draw(st.sampled_from(["truncate", "replace"]))
    # Digits half the time: they keep the JSON valid but change a size, a shape or an offset,
    # which only the checks after parsing (or transformers itself) can catch.
    byte = draw(st.one_of(st.sampled_from(b"0123456789"), st.integers(0, 255)))
    return name, how, draw(st.floats(0.0, 1.0, exclude_max=True)), byte


def _apply(folder: Path, name: str, how: str, where: float, byte: int) -> None:
    path = folder / name
    data = path.read_bytes()
    if name == "model.safetensors" and how == "replace":
        # A changed byte in the tensor data loads as another weight; aim at the length field and
        # the JSON header, where damage can be detected.
        span = 8 + int.from_bytes(data[:8], "little")
    else:
        span = len(data)
    offset = int(where * span)
    if how == "truncate":
        path.write_bytes(data[:offset])
    else:
        path.write_bytes(data[:offset] + bytes([byte]) + data[offset + 1 :])


# Inputs tried by the property below, printed at the end of the run (tests/reliability/conftest.py).
TRIED: dict[str, int] = {}


@DAMAGE
@given(damage())
def test_damaged_model_files_raise_only_model_error(base, tmp_path_factory, spec):
    TRIED["model_files"] = TRIED.get("model_files", 0) + 1
    folder = shutil.copytree(base, tmp_path_factory.mktemp("damaged") / "model")
    _apply(folder, *spec)
    try:
        load_embedder(model_config(name_or_path=str(folder), max_length=8))
    except ModelError as exc:
        assert str(folder) in str(exc), str(exc)
    finally:
        shutil.rmtree(folder.parent)
