"""The Python API: lazy `import pcc_dist`, and README's notebook example run as written, at the
size of the tiny recipe, which it trains as given (a fresh clone has everything it needs: the
`tiny:llama` model is built locally, the data is the shared data folder)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.runs import TIMEOUT, env

ROOT = Path(__file__).resolve().parents[2]

API = ["load_config", "run_training", "load_embedder", "evaluate_sts", "PearsonLoss",
       "InfoNCELoss"]


def test_import_pcc_dist_is_light_and_names_resolve_lazily():
    probe = (
        "import sys, json, pcc_dist\n"
        "heavy = ('torch', 'deepspeed', 'transformers', 'mlflow')\n"
        "light = [m for m in heavy if m in sys.modules]\n"
        f"from pcc_dist import {', '.join(API)}\n"
        "print(json.dumps({'light': light, 'torch': 'torch' in sys.modules,\n"
        "                  'deepspeed': 'deepspeed' in sys.modules}))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=300, env=env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["light"] == []           # nothing heavy at `import pcc_dist`
    assert found["torch"] is True          # ... until a name that needs it is used
    assert found["deepspeed"] is False     # the API's imports still leave DeepSpeed out


def test_api_names_are_the_real_objects():
    import pcc_dist
    from pcc_dist.config import load_config
    from pcc_dist.losses import PearsonLoss

    assert pcc_dist.load_config is load_config and pcc_dist.PearsonLoss is PearsonLoss
    assert set(API) <= set(dir(pcc_dist))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pcc_dist.nope  # noqa: B018


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.distributed
def test_readme_example_trains_the_tiny_recipe_as_given(tmp_path):
    """The README block verbatim, from a folder where its relative paths resolve as in a clone."""
    (tmp_path / "launchers").symlink_to(ROOT / "launchers")
    script = tmp_path / "example.py"
    script.write_text(_readme_example())
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=TIMEOUT, env=env(PCC_CACHE_DIR=str(tmp_path / "c")))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "runs" / "notebook" / "results.json").read_text())
    # The recipe as given: both stages, 3 steps each, the final STS-B evaluation.
    assert {n: s["steps"] for n, s in results["stages"].items()} == {"stage1": 3, "stage2": 3}
    spearman = results["sts"]["spearman"]["STSBenchmark"]
    lines = proc.stdout.strip().splitlines()
    shape, score = lines[-2].rsplit(" ", 1)
    assert shape == "torch.Size([3, 64])"
    assert float(score) == pytest.approx(spearman)  # reloaded model == the trained one
    pcc, nce = map(float, lines[-1].split())
    assert 0.0 <= pcc <= 2.0 and nce > 0 and math.isfinite(nce)
