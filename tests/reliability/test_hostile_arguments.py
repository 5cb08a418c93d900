"""Hostile arguments and inputs through the real command-line tools (issue #19).

Every case runs an installed console script (``pcc-train``, ``pcc-eval``, ``pcc-data``) or
``launchers/train.sh`` as a subprocess and asserts what a user sees: a non-zero exit, no
traceback, and a message that names the file, key or value and the fix. Each has a negative
control: the valid input next to it still works, so a test cannot pass by everything failing.

Runtime: the ``--validate`` and argument cases take ~1-5 s each (``pcc-eval`` imports torch); two
cases start ``pcc-train`` up to its data step, and one trains 2 steps of a tiny random Llama on a
user's CSV (both through DeepSpeed on CPU, with the test-private extension cache of ``_runs``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.runs import BIN, CONFIG, ROOT, env, tiny_llama

from pcc_dist.data import STS7_TASKS

TIMEOUT = 300
# One STS-B test pair (sts-test.csv, first row): de-contamination removes it.
STSB_TEST_ROW = "a girl is styling her hair .,a girl is brushing her hair .,2.5"


def cli(tool: str, *args: str, unset: tuple[str, ...] = (),
        **env_extra: str) -> subprocess.CompletedProcess:
    """Run ``.venv/bin/<tool> args`` from the repository root; ``unset`` drops variables."""
    environment = {k: v for k, v in env(**env_extra).items() if k not in unset}
    return subprocess.run([str(BIN / tool), *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=TIMEOUT)


def refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert a clean refusal (exit != 0, no traceback) whose stderr holds every needle."""
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in:\n{proc.stderr[-4000:]}"
    return proc.stderr


def accepted(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def user_csv(tmp_path_factory) -> Path:
    """A sentence-transformers style ``sentence1,sentence2,score`` file (no ``source`` column):
    16 pairs scored 0-5, one of them an STS-B test pair."""
    rng = random.Random(0)
    words = "cat dog man woman child car tree house river bird plays runs sits eats red".split()
    rows = ["sentence1,sentence2,score", STSB_TEST_ROW]
    for i in range(15):
        left, right = (" ".join(rng.choice(words) for _ in range(5)) for _ in range(2))
        rows.append(f"{left} {i},{right} {i},{rng.uniform(0, 5):.2f}")
    return write(tmp_path_factory.mktemp("data") / "mine.csv", "\n".join(rows) + "\n")


def train_args(model: Path, out: Path, data: Path, *extra: str) -> list[str]:
    """Stage 2 only on ``data`` with the tiny CPU recipe: 2 steps, no evaluation."""
    return ["--config", str(CONFIG), f"model.name_or_path={model}", f"run.output_dir={out}",
            "stage1.enabled=false", f"stage2.data={data}", "stage2.max_steps=2",
            "eval.tasks=[]", "eval.dev=false", *extra]


# --------------------------------------------------------------------------------------------
# 1. A user's own scored pairs (no `source` column), score ranges, pcc-data check = training
# --------------------------------------------------------------------------------------------


def test_user_csv_without_source_trains_stage2_with_defaults(tmp_path_factory, user_csv):
    # Was: "pair 0 has source '', which has no known score range", with no file or line.
    out = tmp_path_factory.mktemp("user_csv") / "run"
    proc = accepted(cli("pcc-train", *train_args(tiny_llama(tmp_path_factory), out, user_csv)))
    assert "removed 1 of 16 training items" in proc.stderr
    assert "per source {'mine.csv': 1}" in proc.stderr
    assert "source 'mine.csv' has no known score range and data.score_range is not set: " \
           "scaling its 15 scores by their observed range" in proc.stderr
    assert (out / "stage2" / "checkpoints" / "step-00000002").is_dir()


def test_data_set_smaller_than_one_global_batch_names_it_its_size_and_the_batch(
        tmp_path_factory, user_csv):
    # Was: ValueError traceback from the batch plan. The control (batch 8) is the test above.
    out = tmp_path_factory.mktemp("small") / "run"
    proc = cli("pcc-train", *train_args(tiny_llama(tmp_path_factory), out, user_csv,
                                        "stage2.global_batch_size=16"))
    refused(proc, f"stage2.data='{user_csv}' has 15 examples after de-contamination removed 1 "
                  "of 16 that occur in STS7 test sets, fewer than one global batch "
                  "(stage2.global_batch_size=16); lower stage2.global_batch_size to at most 15")


def test_pcc_data_check_accepts_a_user_csv_without_source(user_csv):
    proc = accepted(cli("pcc-data", "check", "--train", str(user_csv)))
    assert "mine.csv" in proc.stdout and "observed range [" in proc.stderr


@pytest.fixture(scope="module")
def outlier_csv(tmp_path_factory) -> Path:
    """A 0-5 file where line 4 says 250 (a typo for 2.50)."""
    return write(tmp_path_factory.mktemp("outlier") / "typo.csv",
                 "sentence1,sentence2,score\na b,c d,1.5\ne f,g h,4\ni j,k l,250\nm n,o p,0\n")


def test_pcc_data_check_refuses_a_score_outside_the_declared_range(outlier_csv):
    refused(cli("pcc-data", "check", "--train", str(outlier_csv), "--score-range", "0", "5"),
            f"{outlier_csv}:4: score 250 in column 'score' is outside the allowed range [0, 5]")
    fixed = write(outlier_csv.with_name("fixed.csv"),
                  outlier_csv.read_text().replace(",250\n", ",2.5\n"))
    accepted(cli("pcc-data", "check", "--train", str(fixed), "--score-range", "0", "5"))


def test_training_refuses_the_same_row_as_pcc_data_check(tmp_path_factory, outlier_csv):
    out = tmp_path_factory.mktemp("outlier_run") / "run"
    refused(cli("pcc-train", *train_args(tiny_llama(tmp_path_factory), out, outlier_csv,
                                         "data.score_range=[0,5]", "data.decontaminate=false")),
            f"{outlier_csv}:4: score 250 in column 'score' is outside the allowed range [0, 5]")


def test_pcc_data_check_refuses_a_known_source_score_outside_its_range(tmp_path):
    path = write(tmp_path / "tagged.csv", "sentence1,sentence2,score,source\n"
                                          "a b,c d,2,stsb\ne f,g h,250,stsb\n")
    refused(cli("pcc-data", "check", "--train", str(path)),
            f"{path}:3: score 250 in column 'score' is outside the allowed range [0, 5]")


def test_pcc_data_check_refuses_a_source_whose_scores_are_all_equal(tmp_path):
    path = write(tmp_path / "flat.csv", "sentence1,sentence2,score\na b,c d,3\ne f,g h,3\n")
    refused(cli("pcc-data", "check", "--train", str(path)),
            "all 2 scores of source 'flat.csv' are 3: no similarity signal",
            "data.score_scaling=none")


# --------------------------------------------------------------------------------------------
# 2. Arguments: pcc-eval output and tasks, kernel choice, overrides, YAML
# --------------------------------------------------------------------------------------------


def _unwritable_paths(tmp_path: Path) -> list[tuple[Path, str]]:
    """Output paths this process cannot write, with the reason the message gives. Tests run as
    root here, so permission bits prove nothing: a file in the way, and /proc."""
    blocker = write(tmp_path / "blocker", "")
    paths = [(blocker / "sub" / "results.json", "is a file, not a folder")]
    if not os.access("/proc", os.W_OK) or not _can_create_in("/proc"):
        paths.append((Path("/proc/pcc/results.json"), "cannot write in /proc"))
    return paths


def _can_create_in(folder: str) -> bool:
    try:
        Path(folder, ".pcc-probe").touch()
    except OSError:
        return False
    Path(folder, ".pcc-probe").unlink()
    return True


def test_pcc_eval_json_to_an_unwritable_place_fails_before_any_work(tmp_path):
    # Was: the whole evaluation ran, then write_json raised a traceback.
    for path, reason in _unwritable_paths(tmp_path):
        stderr = refused(cli("pcc-eval", "--tasks", "STSBenchmark", "--json", str(path)),
                         f"--json {path}: ", reason, "choose")
        assert "embedding" not in stderr and "wrote" not in stderr  # nothing was loaded
    folder = tmp_path / "a_folder"
    folder.mkdir()
    refused(cli("pcc-eval", "--json", str(folder)),
            f"--json {folder}: is a folder; give a file path such as {folder / 'results.json'}")


def test_pcc_eval_control_writes_its_json_into_a_new_folder(tmp_path):
    path = tmp_path / "new" / "deeper" / "results.json"
    accepted(cli("pcc-eval", "--tasks", "STSBenchmark", "--limit", "4", "--json", str(path)))
    assert json.loads(path.read_text())["n_pairs"] == {"STSBenchmark": 4}


def test_pcc_eval_empty_tasks_lists_the_valid_names():
    # Was: ValueError("no STS tasks to evaluate") traceback after loading the model.
    stderr = refused(cli("pcc-eval", "--tasks", ""), "--tasks: got '', which names no task",
                     ",".join(STS7_TASKS), "leave it out to score all seven")
    assert "Loading" not in stderr
    refused(cli("pcc-eval", "--tasks", " , "), "--tasks: got ' , ', which names no task")


def test_pcc_eval_unknown_task_is_blamed_on_the_flag():
    refused(cli("pcc-eval", "--tasks", "STS12,STS99"),
            "eval.tasks: unknown task(s) ['STS99']; choose from " + ", ".join(STS7_TASKS),
            "(from --tasks 'STS12,STS99')")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without "
                                                      "CUDA")
# Slow tier: the same check in process is tests/unit/test_config.py::
# test_triton_kernel_without_cuda_is_a_config_error (message, and the interpreter control);
# this one adds the subprocess's stderr for a recipe file and an override.
@pytest.mark.slow
def test_triton_kernel_without_cuda_is_refused_at_validate_time(tmp_path):
    # Was: accepted by --validate, then a RuntimeError traceback when the loss was built.
    refused(cli("pcc-train", "--validate", "loss.kernel=triton", unset=("TRITON_INTERPRET",)),
            "loss.kernel: got 'triton'; kernel='triton' needs a CUDA GPU",
            "Use kernel='auto' or kernel='torch'",
            "(from the command-line override `loss.kernel=triton`)")
    recipe = write(tmp_path / "triton.yaml", "loss:\n  kernel: triton\n")
    refused(cli("pcc-train", "--config", str(recipe), "--validate", unset=("TRITON_INTERPRET",)),
            f"1 configuration problem(s) in {recipe}:", "loss.kernel: got 'triton'")
    # Control: Triton's interpreter (how the kernel tests run on CPU) stays allowed.
    accepted(cli("pcc-train", "--validate", "loss.kernel=triton", TRITON_INTERPRET="1"))


# Slow tier: in process, tests/unit/test_config.py::test_text_fields_take_the_override_as_typed.
@pytest.mark.slow
def test_custom_template_override_is_taken_as_typed():
    # Was: "model.template: got {'Query': {'s': None}}": the override was parsed as YAML.
    proc = accepted(cli("pcc-train", "--validate", "model.template=Query: {s}",
                        "model.kind=decoder"))
    assert "template: 'Query: {s}'" in proc.stdout
    refused(cli("pcc-train", "--validate", "model.template=Query: {x}"),
            "model.template: got 'Query: {x}'; use one of PromptEOL, PromptSUM, PromptSTH or a "
            "custom string containing {s}. (from the command-line override "
            "`model.template=Query: {x}`)")


# Slow tier: in process, tests/unit/test_config.py::
# test_header_names_only_the_overrides_when_the_file_is_fine and
# test_problems_name_the_override_that_caused_them.
@pytest.mark.slow
def test_problems_from_overrides_name_the_override_not_the_yaml_file(tmp_path_factory):
    # Was: "1 configuration problem(s) in launchers/configs/tiny_cpu.yaml: - stage2.lr: ...".
    stderr = refused(cli("pcc-train", "--config", str(CONFIG), "--validate", "stage2.lr=-1"),
                     "1 configuration problem(s) in the command-line overrides:",
                     "stage2.lr: got -1.0; use a positive learning rate such as 5e-4. (from the "
                     "command-line override `stage2.lr=-1`)")
    assert str(CONFIG) not in stderr
    # The recipe names a model folder the e2e tests build; --validate checks that it exists.
    accepted(cli("pcc-train", "--config", str(CONFIG), "--validate", "stage2.lr=1e-4",
                 f"model.name_or_path={tiny_llama(tmp_path_factory)}"))


def test_yaml_alias_bomb_is_refused_in_a_short_message(tmp_path):
    # Was: a 9 MB message (2 GB with the bomb under run.name) after PyYAML built the structure.
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = write(tmp_path / "bomb.yaml", "\n".join(lines) + "\nrun:\n  name: *l8\n")
    assert bomb.stat().st_size < 700
    stderr = refused(cli("pcc-train", "--config", str(bomb), "--validate"),
                     f"--config {bomb}: refused: its anchors and aliases expand to more than "
                     "10,000 values (an alias bomb", "write the values out")
    assert len(stderr) < 1000


# --------------------------------------------------------------------------------------------
# 3. launchers/train.sh: counting GPUs without a torch-capable python3
# --------------------------------------------------------------------------------------------


def _fake_bin(tmp_path: Path, *, gpus: int | None, torch_count: str | None) -> tuple[Path, Path]:
    """A PATH holding only what train.sh needs, a fake ``python3`` without torch, optionally a
    fake ``nvidia-smi`` listing ``gpus`` GPUs; and a fake training Python that records its
    arguments (and answers the torch count with ``torch_count``, or fails like a torch-less
    Python when None)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "grep"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    no_torch = "echo \"ModuleNotFoundError: No module named 'torch'\" >&2; exit 1"
    write(bin_dir / "python3", f"#!/bin/bash\n{no_torch}\n").chmod(0o755)
    if gpus is not None:
        listing = "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(gpus))
        write(bin_dir / "nvidia-smi", f"#!/bin/bash\n{listing}").chmod(0o755)
    record = tmp_path / "argv.txt"
    count = f"echo {torch_count}; exit 0" if torch_count is not None else no_torch
    write(tmp_path / "python", f"#!/bin/bash\nif [[ $1 == -c ]]; then {count}; fi\n"
                               f"echo \"$@\" > {record}\n").chmod(0o755)
    return bin_dir, record


@pytest.mark.parametrize(("gpus", "torch_count", "expected"), [
    (4, None, "4"),    # no torch anywhere: nvidia-smi counts
    (None, None, "1"),  # no torch, no nvidia-smi: one CPU process
    (0, None, "1"),    # nvidia-smi present but lists nothing
    (4, "2", "2"),     # the training Python's torch wins (it honours CUDA_VISIBLE_DEVICES)
    (4, "0", "1"),     # a CPU torch build: one process
])
def test_train_sh_counts_gpus_without_a_torch_capable_python3(tmp_path, gpus, torch_count,
                                                              expected):
    # Was: `python3 -c 'import torch ...'` under `set -e`: ModuleNotFoundError, exit 1.
    bin_dir, record = _fake_bin(tmp_path, gpus=gpus, torch_count=torch_count)
    environment = {"PATH": str(bin_dir), "PYTHON": str(tmp_path / "python"),
                   "HOME": str(tmp_path)}
    proc = subprocess.run([shutil.which("bash"), str(ROOT / "launchers" / "train.sh"),
                           "--config", "x.yaml"], env=environment, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = record.read_text().split()
    assert argv[argv.index("--nproc_per_node") + 1] == expected
    assert argv[-2:] == ["--config", "x.yaml"]


def test_train_sh_explicit_process_count_wins(tmp_path):
    bin_dir, record = _fake_bin(tmp_path, gpus=4, torch_count="2")
    environment = {"PATH": str(bin_dir), "PYTHON": str(tmp_path / "python"),
                   "NPROC_PER_NODE": "3"}
    subprocess.run([shutil.which("bash"), str(ROOT / "launchers" / "train.sh")],
                   env=environment, check=True, timeout=60)
    argv = record.read_text().split()
    assert argv[argv.index("--nproc_per_node") + 1] == "3"


@pytest.mark.parametrize("script", ["train.sh", "train_deepspeed.sh", "mlflow_server.sh",
                                    "slurm.sbatch"])
def test_launcher_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / "launchers" / script)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
