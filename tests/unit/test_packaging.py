"""Packaging: nothing of ours shadows the PyPI ``kernels`` package, the wheel ships
``pcc_dist.kernels``, and the venv that ``make`` builds holds exactly the lock."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "lock.txt"
CHECK_LOCK = REPO / "requirements" / "check_lock.py"

# What `python -c`, `python -m pytest` and notebooks do: the working directory first on sys.path.
# The origin of `kernels` is printed before transformers is imported, so a shadowing folder is
# reported even when it makes that import fail.
_PROBE = """
import importlib.util, json, sys
spec = importlib.util.find_spec("kernels")
print(json.dumps({"kernels": spec.origin if spec else None}), flush=True)
import transformers.modeling_utils, kernels
import pcc_dist.kernels.pearson, pcc_dist.kernels.infonce
print(json.dumps({"pearson": pcc_dist.kernels.pearson.__file__}), flush=True)
"""


def _probe(cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", _PROBE], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _assert_kernels_not_shadowed(cwd: Path) -> Path:
    """From ``cwd``, ``import kernels`` is the installed package and transformers loads; returns
    the file ``pcc_dist.kernels.pearson`` was imported from."""
    proc = _probe(cwd)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    found = {key: value for line in lines for key, value in line.items()}
    origin = found.get("kernels")
    assert origin is not None, f"`kernels` is not installed in {sys.prefix}: {proc.stderr[-800:]}"
    assert "site-packages" in Path(origin).parts, (
        f"from {cwd}, `import kernels` finds {origin}, not the installed package")
    assert proc.returncode == 0, f"importing transformers/pcc_dist.kernels failed:\n{proc.stderr}"
    return Path(found["pearson"])


def test_import_kernels_from_repo_root_is_the_installed_package():
    pearson = _assert_kernels_not_shadowed(REPO)
    assert pearson.resolve() == REPO / "kernels" / "pearson.py"


def test_negative_control_a_top_level_kernels_package_is_caught(tmp_path):
    shutil.copytree(REPO / "kernels", tmp_path / "kernels")
    (tmp_path / "kernels" / "__init__.py").write_text('"""A shadowing package."""\n')
    with pytest.raises(AssertionError, match=r"finds .*kernels/__init__\.py, not the installed"):
        _assert_kernels_not_shadowed(tmp_path)


def test_no_init_file_in_top_level_kernels_folder():
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert (REPO / "pcc_dist" / "kernels").resolve() == REPO / "kernels"


def test_wheel_ships_pcc_dist_kernels_and_no_top_level_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' scratch folder
    wheel = next((tmp_path / "dist").glob("pcc_dist-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("_utils", "pearson", "infonce"):
        assert f"pcc_dist/kernels/{module}.py" in names
    assert not [name for name in names if name.startswith("kernels/")]
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    # The installed wheel, imported from a folder that is not the checkout.
    code = "import pcc_dist.kernels._utils as u, kernels; print(u.__file__, kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0, out.stderr
    utils_file, kernels_file = out.stdout.split()
    assert Path(utils_file) == tmp_path / "site" / "pcc_dist" / "kernels" / "_utils.py"
    assert "site-packages" in Path(kernels_file).parts


def _check_lock(lock: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK_LOCK), str(lock)], capture_output=True,
                          text=True, timeout=120)


def test_make_venv_holds_exactly_the_lock():
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"runs in the venv that `make` builds from the lock (.venv), not {sys.prefix}")
    proc = _check_lock(LOCK)
    assert proc.returncode == 0, proc.stderr
    assert "the venv matches" in proc.stdout


def test_check_lock_reports_every_difference(tmp_path):
    """Negative control of the test above: a lock the venv does not match is refused, naming each
    package: one at another version, one missing from the venv, one not in the lock."""
    lines = LOCK.read_text().splitlines()
    edited = []
    for line in lines:
        if line.startswith("tqdm=="):
            line = "tqdm==0.0.1"
        elif line.startswith("pyyaml=="):
            continue
        edited.append(line)
    edited.append("not-a-real-package==1.0")
    lock = tmp_path / "lock.txt"
    lock.write_text("\n".join(edited) + "\n")
    proc = _check_lock(lock)
    assert proc.returncode == 1
    assert "version   tqdm: installed" in proc.stderr and "locked 0.0.1" in proc.stderr
    assert "extra     pyyaml==" in proc.stderr
    assert "missing   not-a-real-package==1.0" in proc.stderr


def test_check_lock_names_file_and_line_of_a_malformed_lock(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\ntorch>=2\n")
    proc = _check_lock(lock)
    assert proc.returncode == 2
    assert f"{lock}:2: expected `name==version`, got 'torch>=2'" in proc.stderr


def _unmet(requirements: list[str]) -> list[str]:
    """The requirements (core and ``dev``; the ``gpu`` extra is not in the CPU lock) that the
    lock's pins do not satisfy."""
    from packaging.requirements import Requirement

    sys.path.insert(0, str(CHECK_LOCK.parent))
    from check_lock import normalise, parse_pins

    pins = parse_pins(LOCK.read_text().splitlines(), str(LOCK))
    unmet = []
    for text in requirements:
        req = Requirement(text)
        envs = [{"extra": extra} for extra in ("", "dev")]
        if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
            continue
        version = pins.get(normalise(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{req} (lock: {version})")
    return unmet


def test_lock_satisfies_every_requirement_of_setup_py():
    """A range changed in setup.py without `make lock` is caught here, not on a stranger's day."""
    from importlib.metadata import requires

    unmet = _unmet(requires("pcc-dist"))
    assert not unmet, f"requirements/lock.txt does not satisfy setup.py: {unmet}; run `make lock`"


def test_negative_control_an_unsatisfied_range_is_reported():
    unmet = _unmet(["torch>=3", "tqdm>=4.66,<5", 'flash-attn>=2.6; extra == "gpu"'])
    assert len(unmet) == 1 and unmet[0].startswith("torch>=3 (lock: 2.")
