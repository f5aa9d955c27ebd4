"""One frozen settings object for the worker, read from BYZGUARD_* environment variables and .env.

Faust would otherwise read its own environment variables (a stray BROKER_URL silently wins); the App is
built with an empty environment, so these settings are the only way in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Worker settings; every field is BYZGUARD_<NAME> in the environment."""

    model_config = SettingsConfigDict(env_prefix="BYZGUARD_", env_file=".env", extra="ignore", frozen=True)

    config: Path = Field(default=Path("byzguard.yaml"), description="the routes/policies file")
    broker: str | None = Field(default=None, description="bootstrap servers host:port[,host:port]; "
                               "unset: start or reuse the local broker")
    app_id: str = Field(default="byzguard", description="consumer group id and prefix of internal topics")
    data_dir: Path = Field(default=Path(".cache/worker"), description="RocksDB state directory")
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=6066, ge=1, le=65535)
    processing_guarantee: Literal["exactly_once", "at_least_once"] = "exactly_once"
    commit_interval: float = Field(default=0.5, gt=0, description="seconds between commits (and transactions)")
    # faust hard-codes a 1500 ms fetch wait; aiokafka leaves partitions with unread records out of the next fetch,
    # so a fetch of idle partitions alone held the busy ones back for up to that long (app/fetching.py).
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
    state_store: Literal["rocksdb", "memory"] = "rocksdb"
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
    # Quarantine review (app/review): writes need a token; see README "Quarantine review and replay".
    decisions_topic: str | None = Field(default=None, description="compacted review decisions topic; "
                                        "default <app_id>-decisions")
    review_token: SecretStr | None = Field(default=None, description="shared bearer token for review actions; "
                                           "the reviewer names themselves (X-Byzguard-Reviewer)")
    review_tokens: SecretStr | None = Field(default=None, description="per-reviewer tokens 'name:token,...'; "
                                            "the token names the reviewer")
    review_open_reads: bool = Field(default=False, description="serve the review API's reads without a token")
