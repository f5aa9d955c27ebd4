"""One frozen settings object for the worker, read from BYZGUARD_* environment variables and .env.

Faust would otherwise read its own environment variables (a stray BROKER_URL silently wins); the App is
built with an empty environment, so these settings are the only way in.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from byzguard.errors import ConfigError

PREFIX = "BYZGUARD_"
ENV_FILE = "BYZGUARD_ENV_FILE"  # the dotenv file read under the environment (default .env; empty: none)
# BYZGUARD_* variables that are not worker settings but are read elsewhere: the CLI (`run --demo`, the reviewer's
# name), the local broker tool, and the test and benchmark harnesses. MAC key secrets are the configuration's
# `keys:` (secret_env), checked against the configuration file.
OTHER_VARIABLES = frozenset({
    "BYZGUARD_DEMO", "BYZGUARD_REVIEWER", "BYZGUARD_KAFKA_VERSION", "BYZGUARD_CACHE_DIR", "BYZGUARD_TEST_KAFKA",
    "BYZGUARD_KEEP_TOPICS", "BYZGUARD_CHAOS_SEED", "BYZGUARD_FETCH_PAUSE_LEADER", ENV_FILE,
})
#: Values of settings that went with the faust agent runtime (None: every value of it), refused at start saying what
#: to do: a setting is never silently ignored.
REMOVED_VALUES: dict[str, tuple[str | None, str]] = {
    "runtime": ("faust", f"the faust agent runtime was removed; unset {PREFIX}RUNTIME (the batched runtime is the only "
                "one; its state is the faust runtime's, docs/operations.md)"),
    "state_store": ("memory", f"the memory store went with the faust agent runtime; unset {PREFIX}STATE_STORE (the "
                    "state is kept in RocksDB, restored from the changelogs)"),
    "livelock_timeout": (None, f"faust's livelock check went with the faust agent runtime (faust's consumer reads no "
                         f"route, so it has nothing to check); unset {PREFIX}LIVELOCK_TIMEOUT (docs/operations.md)"),
}
_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?):(\d{1,5})$")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class Settings(BaseSettings):
    """Worker settings; every field is BYZGUARD_<NAME> in the environment."""

    model_config = SettingsConfigDict(env_prefix="BYZGUARD_", env_file=os.environ.get(ENV_FILE, ".env") or None,
                                      extra="ignore", frozen=True)

    config: Path = Field(default=Path("byzguard.yaml"), description="the routes/policies file")
    broker: str | None = Field(default=None, description="bootstrap servers host:port[,host:port]; "
                               "unset: start or reuse the local broker")
    app_id: str = Field(default="byzguard", description="consumer group id and prefix of internal topics")
    data_dir: Path = Field(default=Path(".cache/worker"), description="RocksDB state directory")
    # A name that outlives the data dir: a worker restarted after a crash on a wiped or new data dir removes what its
    # dead predecessor of that name left in the consumer groups (app/runtime/membership.py).
    worker_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                                  description="a stable name of this worker, unique among the app's live workers "
                                  "(e.g. a StatefulSet pod name); unset: the data dir's instance id")
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=6066, ge=1, le=65535)
    processing_guarantee: Literal["exactly_once", "at_least_once"] = "exactly_once"
    # at_least_once: the input offsets are stored with the state (the worker resumes from the larger of both), so the
    # group's commit is only the fallback of a wiped data dir: one every commit interval, not one per step (faust's
    # consumer, which reads no route, gets it too).
    commit_interval: float = Field(default=0.1, gt=0, le=60, description="at_least_once: seconds between offset "
                                   "commits at most (a revoke and a stop commit at once; after a crash on a wiped "
                                   "data dir up to this much input runs again)")
    # The batched runtime's consumer fetches with these. faust hard-codes a 1500 ms fetch wait; aiokafka leaves
    # partitions with unread records out of the next fetch, so a fetch of idle partitions alone held the busy ones
    # back for up to that long (bench/fetching.py, measured on the faust agent runtime of earlier releases).
    fetch_min_bytes: int = Field(default=1, ge=1, le=52_428_800,
                                 description="bytes the broker gathers before it answers a fetch")
    fetch_max_wait_ms: int = Field(default=10, ge=1, le=30_000,
                                   description="longest the broker holds a fetch for fetch_min_bytes (milliseconds)")
    # A SIGKILLed worker keeps its partitions until the broker misses its heartbeats for this long (faust's
    # default, 60 s, would stall them for a minute). Kafka's brokers accept 6 s to 30 min by default.
    session_timeout: float = Field(default=10.0, ge=6.0, le=1800.0,
                                   description="seconds without heartbeats before the group gives a worker's "
                                   "partitions to another (heartbeats every tenth of it)")
    log_level: str = "info"
    # faust's livelock check (a partition processing events without a commit) went with the faust agent runtime: its
    # consumer reads no route. Any value is refused with what to do (REMOVED_VALUES).
    livelock_timeout: None = Field(default=None, description="removed: refused at start")
    # The state is always in RocksDB, restored from the changelogs (app/runtime/state.py); `memory` was the faust
    # runtime's, and is refused (a setting is never silently ignored).
    state_store: Literal["rocksdb"] = Field(default="rocksdb", description="where the state is kept: rocksdb "
                                            "(the only store)")
    # What runs the routes' verify streams: the batched runtime (app/runtime), the only one; `faust` (the agent
    # per route of earlier releases) is refused with what to do (docs/configuration.md).
    runtime: Literal["batched"] = Field(default="batched", description="what runs the routes' verify streams: "
                                        "batched (app/runtime), the only runtime")
    batch_max_records: int = Field(default=1000, ge=1, le=100_000,
                                   description="batched runtime: records of one input partition per batch at most")
    batch_max_ms: float = Field(default=100.0, gt=0, le=60_000,
                                description="batched runtime: processing time of one batch at most (milliseconds)")
    # At a paced load the loop, fetching again right after each step, takes steps of a few records per partition as
    # fast as it can, and their per-step work (fetch and produce requests, flights, RocksDB writes) fills all its
    # idle time; at most one step per interval gives it slack (bench/results/tail-9802ec2/NOTE.md).
    step_interval_ms: float = Field(default=10.0, ge=0, le=1000,
                                    description="batched runtime: the loop fetches at most once per this many "
                                    "milliseconds (fewer, larger steps at a paced load; 0: right after each step)")
    # at_least_once: a partition's next batch goes in flight once the outputs of the one before are delivered, its
    # outputs beside that one's changelog (bench/results/latency-6e61a94: c's median latency halved at a paced load).
    batch_overlap: bool = Field(default=True, description="batched runtime, at_least_once: a partition's next batch "
                                "goes in flight once the outputs of the batch before it are delivered (false: once "
                                "that batch is stored)")
    # RocksDB keeps one database per table partition; faust's defaults (64 MB write buffers, a 2 GB block
    # cache, each per database) let a worker with a million entities grow past 400 MB of RSS.
    rocksdb_write_buffer_mb: int = Field(default=8, ge=1, le=256,
                                         description="memtable size per table partition (four of them at most)")
    rocksdb_block_cache_mb: int = Field(default=8, ge=1, le=4096, description="block cache per table partition")
    # glibc lets its mmap threshold slide up to the largest block freed, and then keeps freed fetch buffers in the
    # heap: after a seek-back the RSS stayed 80-100 MB higher (app/memory.py).
    malloc_mmap_threshold_kb: int = Field(default=128, ge=0, le=32768,
                                          description="glibc: allocations of this many KiB or more are mapped on "
                                          "their own and returned to the system when freed (0: glibc's sliding "
                                          "threshold)")
    # Quarantine review (app/review): writes need a token; see docs/review.md.
    decisions_topic: str | None = Field(default=None, description="compacted review decisions topic; "
                                        "default <app_id>-decisions")
    review_token: SecretStr | None = Field(default=None, description="shared bearer token for review actions; "
                                           "the reviewer names themselves (X-Byzguard-Reviewer)")
    review_tokens: SecretStr | None = Field(default=None, description="per-reviewer tokens 'name:token,...'; "
                                            "the token names the reviewer")
    review_open_reads: bool = Field(default=False, description="serve the review API's reads without a token")
    # byzguard relies on private names of faust, mode and aiokafka (app/internals.py): on any other version the
    # worker refuses to start, unless this says to start anyway (with a warning).
    allow_untested_versions: bool = Field(default=False, description="start on faust-streaming, aiokafka or "
                                          "mode-streaming versions byzguard was not tested on (logs a warning)")

    @field_validator("broker")
    @classmethod
    def _bootstrap_servers(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        for server in value.split(","):
            match = _HOST_PORT.match(server.strip())
            if match is None or not 1 <= int(match.group(1)) <= 65535:
                raise ValueError(f"{server.strip()[:100]!r} is not host:port (give host:port[,host:port], "
                                 "for example kafka:9092, without kafka://)")
        return ",".join(server.strip() for server in value.split(","))

    @field_validator("review_tokens")
    @classmethod
    def _token_map(cls, value: SecretStr | None) -> SecretStr | None:
        from byzguard.review import parse_token_map

        if value is not None:
            parse_token_map(value.get_secret_value())  # its message never quotes a token
        return value

    @field_validator(*REMOVED_VALUES, mode="before")
    @classmethod
    def _removed(cls, value: Any, info: ValidationInfo) -> Any:
        removed = REMOVED_VALUES.get(info.field_name or "")
        if removed is not None and value is not None and (removed[0] is None or (
                isinstance(value, str) and value.strip().lower() == removed[0])):
            raise ValueError(removed[1])
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"{value[:30]!r} is not a log level ({', '.join(LOG_LEVELS)})")
        return value.lower()


class SettingsError(ConfigError):
    """Settings refused before anything starts; `problems` has one line per variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def variable(field: str) -> str:
    """The environment variable of a settings field."""
    return f"{PREFIX}{field.upper()}"


def _problem_lines(exc: ValidationError, options: Mapping[str, str]) -> list[str]:
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        where = options.get(field) or variable(field)
        message = str(err["msg"]).removeprefix("Value error, ")
        secret = field.startswith("review_token")
        shown = "" if secret or err["type"] == "missing" else f"={str(err.get('input'))[:60]!r}"
        lines.append(f"{where}{shown}: {message}")
    return lines


def secret_variables(config_path: Path) -> list[str]:
    """The secret_env variables of the configuration's MAC keys (none when it does not read: loading it says why)."""
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    keys = raw.get("keys") if isinstance(raw, dict) else None
    names = [spec.get("secret_env") for spec in (keys or {}).values() if isinstance(spec, dict)] \
        if isinstance(keys, dict) else []
    return [n for n in names if isinstance(n, str) and n]


def unknown_variables(names: Iterable[str], *, key_variables: Iterable[str] = ()) -> list[str]:
    """One line for each BYZGUARD_* name that nothing reads (a misspelling is silently ignored otherwise)."""
    known = {variable(f) for f in Settings.model_fields} | OTHER_VARIABLES | set(key_variables)
    lines = []
    for name in sorted(n for n in set(names) if n.startswith(PREFIX) and n not in known):
        if name.startswith(f"{PREFIX}KEY_"):
            continue  # a MAC key secret of another configuration sharing this environment: not ours to judge
        near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        lines.append(f"{name}: unknown setting" + (f"; did you mean {near[0]}?" if near else ""))
    return lines


def load_settings(options: Mapping[str, Any] | None = None, *,
                  option_names: Mapping[str, str] | None = None) -> Settings:
    """The settings from the environment (and .env) with command-line `options` on top, every problem found at
    once: SettingsError with one line per variable (and per unknown BYZGUARD_* variable)."""
    env = os.environ
    given = {k: v for k, v in (options or {}).items() if v is not None}
    option_names = {k: v for k, v in (option_names or {}).items() if k in given}  # the rest came from variables
    problems: list[str] = []
    settings: Settings | None = None
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        problems.extend(_problem_lines(exc, option_names or {}))
    names = set(env) | set(_dotenv_names())
    config = settings.config if settings is not None else Path(str(given.get("config") or env.get(
        variable("config")) or "byzguard.yaml"))
    problems.extend(unknown_variables(names, key_variables=secret_variables(config)))
    if problems or settings is None:
        raise SettingsError(problems)
    return settings


def _dotenv_names() -> list[str]:
    env_file = Settings.model_config.get("env_file")
    if not isinstance(env_file, str) or not Path(env_file).is_file():
        return []
    from dotenv import dotenv_values

    return list(dotenv_values(env_file))


def settings_or_exit(options: Mapping[str, Any] | None = None, *, option_names: Mapping[str, str] | None = None,
                     exit_code: int = 2) -> Settings:
    """load_settings for a command: on problems, print one line each (no traceback) and exit with `exit_code`."""
    import typer
    from rich.console import Console
    from rich.markup import escape

    try:
        return load_settings(options, option_names=option_names)
    except SettingsError as exc:
        console = Console(stderr=True)
        for line in exc.problems:
            console.print(f"[bold red]setting refused[/]: {escape(line)}", soft_wrap=True)
        raise typer.Exit(exit_code) from None


# --------------------------------------------------------------------------- without a configured broker

NO_DEV_TOOLS = ("this installation has no development tools (app/dev/ is left out of the image): local mode, the "
                "local broker and the demo run from a checkout of the repository")


def dev_tools_installed() -> bool:
    """Whether the development-only package app/dev/ is here: a checkout has it, the worker image leaves it out."""
    try:
        import app.dev  # noqa: F401
    except ImportError:
        return False
    return True


def running_local_broker() -> str | None:
    """The bootstrap servers of the local broker tool's running broker (app/dev/localkafka.py); None when none
    runs or this installation has no development tools."""
    if not dev_tools_installed():
        return None
    from app.dev.localkafka import running_broker

    return running_broker()
