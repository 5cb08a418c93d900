"""`pcc SUB ...` dispatches to the pcc-* entry points; one PccError base for expected failures."""

import importlib.metadata
import sysconfig

import pytest
import yaml

from pcc_dist import cli
from pcc_dist.checkpoint import CheckpointError
from pcc_dist.config import ConfigError
from pcc_dist.config_yaml import AliasBombError
from pcc_dist.data import DataError
from pcc_dist.devices import DeviceError
from pcc_dist.errors import PccError
from pcc_dist.export_target import ExportError
from pcc_dist.modeling import ModelError
from pcc_dist.stage_data import TrainingError


def test_pcc_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in ("train", "eval", "data", "export", "sync-mlflow"))


def test_pcc_refuses_an_unknown_or_missing_subcommand(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown subcommand 'trian'" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "no subcommand given" in capsys.readouterr().err


def test_pcc_sub_help_is_the_entry_points_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    assert info.value.code == 0
    assert "model.lora.r (int; default 64)" in capsys.readouterr().out
    assert cli.main(["data"]) == cli.data_main([]) == 2  # pcc-data's usage error, either way


def test_pcc_prints_an_expected_failure_without_traceback(monkeypatch, capsys):
    def fails(argv):
        raise ExportError(f"target {argv[0]} is refused")

    monkeypatch.setitem(cli.SUBCOMMANDS, "export", (fails, "export"))
    assert cli.main(["export", "out"]) == 2
    assert capsys.readouterr().err == "pcc export: target out is refused\n"
    # Negative control: an unexpected error is no PccError and still raises.
    monkeypatch.setitem(cli.SUBCOMMANDS, "export", (lambda argv: 1 / 0, "export"))
    with pytest.raises(ZeroDivisionError):
        cli.main(["export", "out"])


@pytest.mark.parametrize(("error", "builtin"), [
    (ConfigError, ValueError), (DataError, ValueError), (ModelError, ValueError),
    (ExportError, ValueError), (DeviceError, ValueError), (CheckpointError, RuntimeError),
    (TrainingError, RuntimeError), (AliasBombError, yaml.YAMLError)])
def test_every_expected_failure_is_a_pcc_error_and_keeps_its_builtin_base(error, builtin):
    assert issubclass(error, PccError) and issubclass(error, builtin)


def test_pcc_console_script_is_declared():
    # The installed metadata in site-packages: a stale pcc_dist.egg-info in the checkout (left
    # by an older setuptools build) would otherwise be found first through the cwd on sys.path.
    installed = importlib.metadata.distributions(path=[sysconfig.get_paths()["purelib"]])
    scripts = {e.name: e.value for d in installed for e in d.entry_points
               if e.group == "console_scripts" and e.name.startswith("pcc")}
    assert scripts["pcc"] == "pcc_dist.cli:main"
    assert {"pcc-train", "pcc-eval", "pcc-data", "pcc-export"} <= set(scripts)
