"""Local mode's MAC key secrets: made up once, kept in the git-ignored cache, reused by every tool after.

Local mode (no BYZGUARD_BROKER) runs the demo's producers and a worker on this machine with the configuration's
MAC keys. When a key's secret variable is unset, a random secret is made up, so that a first `make run` needs no
setup. It is kept in `.cache/local-secrets.json` (readable only by the user), so the next run, the contract
check, verify-again and the review page see the same keys, and the records of an earlier run do not turn into
`integrity.bad_mac`. A variable set in the environment always wins; the file is never used with a real broker.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import MutableMapping
from pathlib import Path

import orjson

from app.settings import secret_variables

CACHE = Path(".cache") / "local-secrets.json"


def _read(path: Path) -> dict[str, str]:
    try:
        kept = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return {k: v for k, v in kept.items() if isinstance(k, str) and isinstance(v, str) and v} \
        if isinstance(kept, dict) else {}


def _write(path: Path, kept: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(orjson.dumps(kept, option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)
    os.chmod(path, 0o600)


def use_local_secrets(config_path: Path, environ: MutableMapping[str, str] | None = None, *, make_up: bool = True,
                      path: Path = CACHE) -> tuple[list[str], list[str]]:
    """Set every unset secret variable of the configuration from the kept secrets; with make_up, make up and keep
    the ones not kept yet. Returns (made up now, reused from the file)."""
    env = os.environ if environ is None else environ
    wanted = [n for n in secret_variables(config_path) if not env.get(n)]
    if not wanted:
        return [], []
    kept = _read(path)
    made, reused = [], []
    for name in wanted:
        if name in kept:
            reused.append(name)
        elif make_up:
            kept[name] = secrets.token_hex(24)
            made.append(name)
        else:
            continue
        env[name] = kept[name]
    if made:
        _write(path, kept)
    return made, reused
