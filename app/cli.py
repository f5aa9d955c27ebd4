"""The `byzguard` command line: run the worker, check a configuration, manage the local broker."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from app.audit_cli import audit_cli
from app.cli_contract import contract_cli
from app.cli_quarantine import quarantine_cli
from byzguard import config as guard_config
from byzguard.errors import ConfigError
from byzguard.verdict import Code

cli = typer.Typer(help="byzguard: guard inter-service Kafka events against Byzantine failures.",
                  no_args_is_help=True, add_completion=False)
console = Console(stderr=True)

# The demo's defaults (`byzguard demo`, app/dev/demo.py).
DEFAULT_EVENTS = 2000
DEFAULT_RATE = 0.02
DEFAULT_EPS = 500.0
#: Seconds the orders audit waits for a payment in a worker the demo starts. The demo's payments follow their
#: orders within a few events, so 20 s is ample here and the partial writes are reported within the run; a
#: production window covers real payment delays (the example's is 10 minutes) and the demo leaves it as it is.
DEMO_AUDIT_WINDOW = 20.0


def _load_config(path: Path, *, require_secrets: bool = True) -> guard_config.GuardConfig:
    try:
        return guard_config.load(path, require_secrets=require_secrets)
    except ConfigError as exc:
        console.print(f"[bold red]configuration refused[/]: {escape(str(exc))}")
        raise typer.Exit(2) from None


@cli.command()
def run(
    config: Annotated[Path | None, typer.Option(help="routes file (default BYZGUARD_CONFIG or byzguard.yaml)")] = None,
    broker: Annotated[str | None, typer.Option(help="bootstrap servers; default BYZGUARD_BROKER or local")] = None,
    demo: Annotated[bool, typer.Option("--demo/--no-demo", envvar="BYZGUARD_DEMO",
                                       help="with the local broker: play `byzguard demo` against the worker first")]
    = True,
) -> None:
    """Run a guard worker (joins the consumer group; starts the local broker if none is configured).

    With the local broker (no BYZGUARD_BROKER), the worker runs as a child process and `byzguard demo` plays four
    services against it first, prints the score, and leaves the worker running; --no-demo skips that."""
    from app.settings import NO_DEV_TOOLS, dev_tools_installed, settings_or_exit

    # Every setting is checked before anything touches the broker (one line per problem, naming the variable).
    settings = settings_or_exit({"config": config, "broker": broker},
                                option_names={"config": "--config", "broker": "--broker"})
    refuse_untested_versions(settings.allow_untested_versions)
    if not settings.broker and not dev_tools_installed():
        console.print(f"[bold red]cannot start[/]: no broker configured (BYZGUARD_BROKER or --broker); {NO_DEV_TOOLS}",
                      soft_wrap=True)
        raise typer.Exit(2)
    if not settings.broker:
        from app.dev.demo import announce_demo_secrets

        announce_demo_secrets(settings.config, console)
    cfg = _load_config(settings.config)
    bootstrap = settings.broker
    if not bootstrap:
        from app.dev.localkafka import ensure_running

        bootstrap = ensure_running(announce=lambda what: console.print(
            f"[cyan]no broker configured (BYZGUARD_BROKER): {what}...[/]"))
        try:
            if demo:
                from app.dev.demo import run_local

                raise typer.Exit(run_local(settings, cfg, bootstrap))
            _run_worker(settings, cfg, bootstrap)
        finally:
            say_local_broker_runs(bootstrap)
        return
    _run_worker(settings, cfg, bootstrap)


def refuse_untested_versions(allow_untested: bool) -> None:
    """Exit 2 with one clear message if faust-streaming, aiokafka or mode-streaming is at a version byzguard was
    not tested on (app/internals.py); with `allow_untested` (BYZGUARD_ALLOW_UNTESTED_VERSIONS=1) only warn."""
    from app.internals import UntestedVersionsError, check_versions

    try:
        check_versions(allow_untested=allow_untested)
    except UntestedVersionsError as exc:
        console.print(f"[bold red]cannot start[/]: {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None


def say_local_broker_runs(bootstrap: str) -> None:
    """After the worker stopped: the local broker it used keeps running (for the next run); say how to stop it."""
    console.print(f"[cyan]the local Kafka broker keeps running at {bootstrap}[/] (the next run reuses it); stop it "
                  "with [bold]make broker-stop[/] or [bold]python -m app.dev.localkafka stop[/]")


def _run_worker(settings: object, cfg: guard_config.GuardConfig, bootstrap: str) -> None:
    import asyncio

    from faust.worker import Worker as FaustWorker

    from app import eos
    from app.memory import fix_mmap_threshold
    from app.provision import provision
    from app.settings import Settings
    from app.worker import build_app

    assert isinstance(settings, Settings)
    fix_mmap_threshold(settings.malloc_mmap_threshold_kb)  # before the first fetch buffer
    try:
        cfg = asyncio.run(provision(bootstrap, cfg, settings.app_id))
    except ConfigError as exc:
        console.print(f"[bold red]cannot start[/]: {exc}")
        raise typer.Exit(2) from None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        built = build_app(settings, cfg, bootstrap)
    except ConfigError as exc:  # e.g. a route the chosen runtime does not run
        console.print(f"[bold red]cannot start[/]: {exc}")
        raise typer.Exit(2) from None
    console.print(f"[bold green]byzguard[/] worker [bold]{settings.app_id}[/] on broker {bootstrap}")
    for route in cfg.routes:
        console.print(f"  route [bold]{route.name}[/]: {', '.join(route.inputs)} -> verified "
                      f"[green]{route.verified_topic}[/], quarantine [red]{route.quarantine_topic}[/]")
    base = f"http://{settings.web_host}:{settings.web_port}"
    console.print(f"  web {base}/  metrics {base}/metrics  state {settings.data_dir}")
    console.print(f"  runtime: [bold]{settings.runtime}[/] ({settings.processing_guarantee}; README \"Runtimes\")")
    class Worker(FaustWorker):  # named as faust's: its log lines say "[^Worker]: Ready"
        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            super().on_setup_root_logger(logger, level)
            built.quiet_logs.attach(logger)  # repeats of the libraries' warnings are counted, not written

    worker = Worker(built.app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    # After a crash faust's tables may hold writes of aborted transactions: restore them from the changelogs. The
    # batched runtime's databases (routes and audit joins alike) only ever hold committed state: nothing is discarded,
    # unless a faust-runtime worker on this data dir did not stop cleanly (its marker is still there).
    faust_tables = settings.runtime == "faust" or (settings.data_dir / eos.RUNNING_MARKER).exists()
    with eos.crash_safe_state(settings.data_dir, built.app.conf.tabledir,
                              enabled=settings.processing_guarantee == "exactly_once" and faust_tables):
        worker.execute_from_commandline()


config_cli = typer.Typer(help="Check configuration files.", no_args_is_help=True)
cli.add_typer(config_cli, name="config")
cli.add_typer(contract_cli, name="contract")
cli.add_typer(audit_cli, name="audit")
cli.add_typer(quarantine_cli, name="quarantine")


@cli.command("demo")
def demo(
    events: Annotated[int, typer.Option(min=1, help="events to send")] = DEFAULT_EVENTS,
    rate: Annotated[float, typer.Option(min=0.0, max=0.09, help="probability per event of each failure class")]
    = DEFAULT_RATE,
    eps: Annotated[float, typer.Option(min=1.0, help="events per second to send")] = DEFAULT_EPS,
    seed: Annotated[int | None, typer.Option(help="random seed (default: a random one)")] = None,
    worker: Annotated[str, typer.Option(help="auto: the worker answering at BYZGUARD_WEB_PORT, else start one; "
                                             "start: always start one; none: send and score only")] = "auto",
    config: Annotated[Path | None, typer.Option(help="routes file (default BYZGUARD_CONFIG or byzguard.yaml)")]
    = None,
    broker: Annotated[str | None, typer.Option(help="bootstrap servers; default BYZGUARD_BROKER or local")] = None,
    live: Annotated[bool, typer.Option("--live/--no-live", help="show the live summary while sending")] = True,
    report: Annotated[Path | None, typer.Option(help="also write the score as JSON to this file")] = None,
    audit_window: Annotated[float, typer.Option(min=0.0, help="seconds the orders audit of a worker the demo "
                                                              "starts waits for a payment (0: as configured)")]
    = DEMO_AUDIT_WINDOW,
) -> None:
    """Play four services (pricing, orders, payments, permissions) against a guard worker with every failure class
    injected, and score what it caught. Exit 1 when a fault was missed, a clean event flagged or
    an event lost."""
    from app.settings import NO_DEV_TOOLS, dev_tools_installed

    if not dev_tools_installed():
        console.print(f"[bold red]no demo here[/]: {NO_DEV_TOOLS}", soft_wrap=True)
        raise typer.Exit(2)
    from app.dev.demo import demo_main  # development-only (app/dev/): loaded when the demo runs

    demo_main(events=events, rate=rate, eps=eps, seed=seed, worker=worker, config=config, broker=broker, live=live,
              report=report, audit_window=audit_window)


@config_cli.command("check")
def config_check(path: Path) -> None:
    """Validate a configuration file and print its routes; exit 2 with file:line when it is wrong. Checking needs no
    MAC key secret: the unset ones are listed (the worker refuses to start without them)."""
    import os

    from app.settings import secret_variables

    cfg = _load_config(path, require_secrets=False)
    for route in cfg.routes:
        types = ", ".join(sorted(route.types)) or "(none listed)"
        unlisted = route.fallback.level(Code.TYPE_UNLISTED).value  # the allow-list: reject, or warn by opt-in
        inputs = [f"{t} (written by {route.input_sources[t]})" if t in route.input_sources else t
                  for t in route.inputs]
        console.print(escape(f"route {route.name}: inputs {inputs}; types {types}; "
                             f"unlisted types: {unlisted}"))
    for source, forms in sorted((cfg.routes[0].fallback.forms if cfg.routes else {}).items()):
        lenient = sorted(forms - {"bound"})
        if lenient:  # what the guard lets through unbound: the operator should see it at every check
            console.print(escape(f"source {source}: also accepts integrity forms {lenient} (attributes not "
                                 "protected; each such event warns integrity.legacy_form)"))
    unset = [name for name in secret_variables(path) if not os.environ.get(name)]
    if unset:
        console.print(f"[yellow]note[/]: {', '.join(unset)} not set here; a worker needs them (local mode makes "
                      "them up)")
    console.print("[green]configuration OK[/]")


def main() -> None:
    """Entry point of the `byzguard` script."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    cli()


if __name__ == "__main__":
    main()
