"""The built wheel, installed with the client extra into a fresh virtualenv: the client API and nothing of the
worker (no top-level `app`, `agents`, `tables` or `topics`, no faust)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER_PACKAGES = ("app", "agents", "tables", "topics")

PROBE = """
import importlib.metadata, importlib.util, pathlib, sys
import byzguard
from byzguard import GuardedProducer, Key, KeyRing, Stamper, get_last_known_good, load_contract, verify_again
names = [getattr(byzguard, name) for name in byzguard.__all__]
key = Key("pricing-1", "pricing", b"s3cret")
stamped = Stamper("pricing", algorithm="hmac-sha256", key=key).binary(
    {"price": 9.5}, type="price.updated", subject="sku-1", version=1)
again = verify_again(stamped.key, stamped.value, stamped.headers, KeyRing({"pricing-1": key}))
print("verified", again.ok)
print("typed", (pathlib.Path(byzguard.__file__).parent / "py.typed").is_file())
print("kafka", importlib.util.find_spec("aiokafka") is not None)
print("absent", [m for m in ("app", "agents", "tables", "topics", "faust", "mode", "rocksdict")
                 if importlib.util.find_spec(m) is not None])
print("plugin", [e.value for e in importlib.metadata.entry_points(group="pytest11") if e.name == "byzguard_contract"])
print("prefix", sys.prefix)
"""


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{args[:4]}...\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_client_wheel_installs_the_client_without_the_worker(tmp_path: Path) -> None:
    """A fresh virtualenv with the wheel and its `client` extra stamps, verifies again and has aiokafka, the
    contract plugin and py.typed, but no top-level app, agents, tables or topics (and no faust); its `byzguard`
    script says where the worker runs."""
    source = tmp_path / "source"  # the repository's layout, worker packages included, built outside the worktree
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("byzguard", *WORKER_PACKAGES):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), str(source)],
         tmp_path, 300)
    (wheel,) = dist.glob("byzguard-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert tops == {"byzguard", f"byzguard-{wheel.name.split('-')[1]}.dist-info"}, tops

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--disable-pip-version-check",
          "-c", str(ROOT / "constraints.txt"), f"{wheel}[client]"], tmp_path, 300)
    lines = dict(line.split(" ", 1) for line in _run([str(python), "-c", PROBE], tmp_path, 120).stdout.splitlines())
    assert lines["verified"] == "True"
    assert lines["typed"] == "True"
    assert lines["kafka"] == "True"
    assert lines["absent"] == "[]"
    assert lines["plugin"] == "['byzguard.contract.pytest_plugin']"
    assert Path(lines["prefix"]) == env_dir
    script = subprocess.run([str(env_dir / "bin" / "byzguard"), "run"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, check=False, env={"PATH": "/usr/bin:/bin"})
    assert script.returncode == 2 and "the worker's command line is not installed" in script.stderr
