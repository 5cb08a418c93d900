"""Secrets: nothing that looks like a credential reaches params, tags, artifacts or the journal."""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


REDACTED = "***"

_SECRET_ENV_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL|^AWS_", re.IGNORECASE)
# Last component of a param/tag key that names a credential ("hub.token", "db_password");
# "max_tokens" and "tokenizer" do not match.
_SECRET_KEY_NAME = re.compile(
    r"(?:^|[._-])(?:token|secret|password|passwd|api[_-]?key|access[_-]?key|secret[_-]?key|"
    r"private[_-]?key|credentials?)$", re.IGNORECASE)
_SECRET_VALUE = re.compile(
    r"hf_[A-Za-z0-9]{30,}"                        # Hugging Face access token
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"                 # AWS access key id
    r"|sk-[A-Za-z0-9_-]{20,}"                     # OpenAI-style API key
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"              # Slack token
    r"|eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+"  # JWT
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----")
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*:)[^/@\s]+(?=@)")
# Values of secret-named env vars shorter than this are not treated as secrets: "1", "true" or
# "en" would otherwise redact ordinary params; real tokens are 20-100 characters.
_MIN_SECRET_LEN = 6
# Text artifacts larger than this are uploaded unscanned (model weights, big tokenizer files).
_MAX_SCAN_BYTES = 5 * 1024 * 1024


def _env_secrets() -> list[str]:
    """Values of env vars whose name looks secret, longest first (so substrings go last)."""
    values = {v for k, v in os.environ.items()
              if _SECRET_ENV_NAME.search(k) and len(v.strip()) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """Replace secrets inside free text (config files, messages) with ``***``.

    Args:
        text: Any text.
        secrets: Env secret values; None reads the environment now.

    Returns:
        ``text`` with every secret env value, every token-shaped string and every URL password
        replaced by ``***``.
    """
    for secret in _env_secrets() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    text = _SECRET_VALUE.sub(REDACTED, text)
    return _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)


def _redact_value(key: str, value: Any, secrets: list[str]) -> Any:
    if isinstance(value, Mapping):
        return {k: _redact_value(f"{key}.{k}", v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(key, v, secrets) for v in value)
    if not isinstance(value, str):
        return REDACTED if str(value) in secrets else value
    if value and _SECRET_KEY_NAME.search(key):
        return REDACTED
    if any(s in value for s in secrets) or _SECRET_VALUE.search(value):
        return REDACTED
    return _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, value)


def redact(params: dict) -> dict:
    """Params with every secret-looking value replaced by ``***``.

    A value is replaced when it equals or contains the value of an env var whose name looks
    secret (``TOKEN``, ``KEY``, ``SECRET``, ``PASSWORD``, ``CREDENTIAL``, ``AWS_*``; values of at
    least 6 characters), when it has the shape of a known token (``hf_…``, ``ghp_…``,
    ``AKIA…``, ``sk-…``, JWT, private key), or when its key names a credential (``hub.token``,
    ``db_password``). The password inside a URL (``https://user:pw@host``) is replaced in place.
    Nested mappings and lists are redacted recursively; the input is not modified.

    Args:
        params: Flat or nested mapping of names to values.

    Returns:
        A new mapping of the same shape.
    """
    secrets = _env_secrets()
    return {k: _redact_value(str(k), v, secrets) for k, v in params.items()}


def safe_uri(uri: str | None) -> str:
    """``uri`` redacted for messages; a placeholder when MLflow's default is used."""
    return redact_text(uri) if uri else "<MLflow default>"


def short_error(exc: BaseException, limit: int = 240) -> str:
    """One redacted line naming ``exc``, at most ``limit`` characters."""
    text = redact_text(f"{type(exc).__name__}: {exc}".replace("\n", " "))
    return text if len(text) <= limit else text[:limit] + "..."


def redacted_copy(path: Path, out_dir: Path) -> Path:
    """``path`` itself when no text file in it holds a secret; else a redacted mirror.

    A folder mirror links the clean files (model weights are not copied) and writes redacted
    copies of the others.
    """
    secrets = _env_secrets()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    dirty: dict[Path, str] = {}
    for file in files:
        if file.stat().st_size > _MAX_SCAN_BYTES:
            continue
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        clean = redact_text(text, secrets)
        if clean != text:
            dirty[file] = clean
    if not dirty:
        return path
    target = out_dir / uuid.uuid4().hex[:8] / path.name
    if path.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(dirty[path], encoding="utf-8")
    else:
        for file in files:
            dest = target / file.relative_to(path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if file in dirty:
                dest.write_text(dirty[file], encoding="utf-8")
            else:
                try:
                    dest.symlink_to(file)
                except OSError:
                    shutil.copy2(file, dest)
    logger.info("artifact %s contains secrets; uploading a redacted copy", path)
    return target
