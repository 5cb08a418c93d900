"""Optional dependencies: a missing one fails with an error naming the setup.py extra to install,
and setup.py's core holds only what the code imports on every run's path."""

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _setup_lists() -> dict[str, list[str]]:
    """The module-level lists of setup.py (CORE, HUB, ...), read without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:  # a list with *starred extras
                continue
    return out


def _names(requirements: list[str]) -> set[str]:
    return {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0] for r in requirements}


def test_core_holds_only_what_every_run_imports():
    lists = _setup_lists()
    core = _names(lists["CORE"])
    assert {"datasets", "matplotlib", "bitsandbytes", "triton", "safetensors"}.isdisjoint(core)
    assert {"torch", "deepspeed", "transformers", "mlflow", "scipy", "pyyaml"} <= core
    assert "deepspeed>=0.19.3,<0.20" in lists["CORE"]
    # mlflow as a range; the lock keeps the exact version.
    mlflow = next(r for r in lists["CORE"] if r.startswith("mlflow"))
    assert "==" not in mlflow and "mlflow==" in (REPO / "requirements" / "lock.txt").read_text()
    # safetensors is never imported by our code (transformers brings it).
    sources = [p.read_text() for p in (REPO / "pcc_dist").rglob("*.py")]
    assert not any("import safetensors" in s or "from safetensors" in s for s in sources)


@pytest.fixture()
def missing(monkeypatch):
    """Make ``import NAME`` raise ImportError (sys.modules[NAME] = None)."""
    def hide(*names):
        for name in names:
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                monkeypatch.delitem(sys.modules, loaded)
            monkeypatch.setitem(sys.modules, name, None)
    return hide


def test_missing_bitsandbytes_names_the_qlora_extra(missing):
    from pcc_dist.modeling._core import _BNB_HINT, ModelError, _import_or_error

    missing("bitsandbytes")
    with pytest.raises(ModelError, match=r"needs bitsandbytes.*pcc-dist\[qlora\]"):
        _import_or_error("bitsandbytes", "model.mode", "qlora", _BNB_HINT)


# datasets and triton: tests/unit/test_data.py and test_losses_reference.py.


def test_missing_matplotlib_names_the_plots_extra(missing, tmp_path):
    from pcc_dist.tracking.plots import plot_metrics

    missing("matplotlib")
    with pytest.raises(ImportError, match=r"pcc-dist\[plots\]"):
        plot_metrics({"train/loss": [(1, 0.5)]}, tmp_path / "p.png")
