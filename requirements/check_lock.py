"""Check that a venv holds exactly the packages of the lock file, each at its locked version.

Usage: ``python requirements/check_lock.py requirements/lock.txt`` with the venv's python. Compares
``pip freeze --all --exclude-editable`` (pip and setuptools included, the editable project left
out) with the lock's ``name==version`` lines, names normalised as PEP 503 does (``PyYAML`` and
``pyyaml`` are one package). Exit 0 when they agree; else exit 1 listing every package that is
missing, extra or at another version.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def normalise(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-``, ``_`` and ``.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(lines: list[str], source: str) -> dict[str, str]:
    """``{normalised name: version}`` of the ``name==version`` lines; comments and blanks skipped.

    Raises:
        ValueError: a line that is neither a pin nor a comment, naming ``source`` and the line.
    """
    pins: dict[str, str] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"{source}:{number}: expected `name==version`, got {line!r}")
        pins[normalise(match.group(1))] = match.group(2)
    return pins


def differences(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """One line per package that differs between the lock and the venv (empty when equal)."""
    problems = []
    for name in sorted(locked.keys() | installed.keys()):
        want, have = locked.get(name), installed.get(name)
        if want == have:
            continue
        if have is None:
            problems.append(f"missing   {name}=={want}")
        elif want is None:
            problems.append(f"extra     {name}=={have} (not in the lock)")
        else:
            problems.append(f"version   {name}: installed {have}, locked {want}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python requirements/check_lock.py LOCK_FILE", file=sys.stderr)
        return 2
    lock = Path(argv[0])
    try:
        locked = parse_pins(lock.read_text(encoding="utf-8").splitlines(), str(lock))
    except (OSError, ValueError) as err:
        print(f"check_lock: cannot read the lock: {err}", file=sys.stderr)
        return 2
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            capture_output=True, text=True, check=False)
    if freeze.returncode != 0:
        print(f"check_lock: pip freeze failed: {freeze.stderr.strip()}", file=sys.stderr)
        return 2
    installed = parse_pins(freeze.stdout.splitlines(), "pip freeze")
    problems = differences(locked, installed)
    if problems:
        print(f"check_lock: {sys.prefix} does not hold exactly {lock} ({len(problems)} "
              "differences); `make install` syncs the venv to the lock, `make lock` regenerates "
              "the lock:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"check_lock: {len(locked)} packages, the venv matches {lock}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
