"""Flags, logging, signals and exit codes; wires config -> poller -> exposition -> server."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from functools import partial

from . import __version__, logs, queries
from .config import ConfigError, load_config
from .dsn import connect
from .metrics import Exposition
from .poller import Poller
from .probe import Prober, probe_timeout
from .server import ListenAddressError, MetricsServer

log = logging.getLogger(__name__)

DEFAULT_PORT = 10105
ENV_PREFIX = "PG_ADVISORY_LOCK_EXPORTER_"

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2


def env_name(flag: str) -> str:
    """--web.listen-address -> PG_ADVISORY_LOCK_EXPORTER_WEB_LISTEN_ADDRESS"""
    return ENV_PREFIX + flag.lstrip("-").replace(".", "_").replace("-", "_").upper()


def _env_bool(flag: str) -> bool:
    return os.environ.get(env_name(flag), "").strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pg-advisory-lock-exporter",
        description="Prometheus exporter for PostgreSQL advisory locks, per named key. "
        f"Every flag also reads from the environment variable {ENV_PREFIX}<FLAG>, e.g. "
        f"{env_name('--config.file')}.",
    )

    def flag(name: str, default: str, help_text: str, **kwargs: object) -> None:
        parser.add_argument(
            name, default=os.environ.get(env_name(name), default),
            help=f"{help_text} (env {env_name(name)}; default %(default)s)", **kwargs,  # type: ignore[arg-type]
        )

    flag("--config.file", "config.yaml", "config file to load", dest="config_file", metavar="PATH")
    flag("--web.listen-address", f":{DEFAULT_PORT}", "address to serve on", dest="listen_address", metavar="[HOST]:PORT")
    flag("--web.telemetry-path", "/metrics", "path of the metrics", dest="telemetry_path", metavar="PATH")
    flag("--log.level", "info", "log level: " + "|".join(logs.LEVELS), dest="log_level", metavar="LEVEL")
    flag("--log.format", "logfmt", "log format: " + "|".join(logs.FORMATS), dest="log_format", metavar="FORMAT")
    parser.add_argument(
        "--check-config", action="store_true", default=_env_bool("--check-config"),
        help=f"validate the config (no database needed), print a summary and exit (env {env_name('--check-config')})",
    )
    parser.add_argument("--version", action="version", version=f"pg-advisory-lock-exporter {__version__}")
    return parser


def _check_choice(parser: argparse.ArgumentParser, flag: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        parser.error(f"{flag}: {value!r} is not one of {', '.join(choices)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_choice(parser, "--log.level", args.log_level, logs.LEVELS)
    _check_choice(parser, "--log.format", args.log_format, logs.FORMATS)
    if not args.telemetry_path.startswith("/"):
        parser.error(f"--web.telemetry-path: {args.telemetry_path!r} must start with /")
    logs.setup(args.log_level, args.log_format)

    try:
        config = load_config(args.config_file)
    except ConfigError as exc:
        for detail in exc.details:
            print(f"{exc.source}: {detail}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"{args.config_file}: ok: {config.summary()}")
        return EXIT_OK

    exposition = Exposition()
    first_poll = threading.Event()

    def publish(snapshot: object) -> None:
        exposition.publish(snapshot)  # type: ignore[arg-type]
        first_poll.set()

    poller = Poller(
        config,
        connect=partial(connect, config.dsn, queries.APPLICATION_NAME, config.poll_interval),
        publish=publish,
    )
    prober = Prober(
        config,
        connect=lambda database: connect(config.dsn, queries.PROBE_APPLICATION_NAME, probe_timeout(config), database),
        publish=exposition.publish_probes,
    )
    try:
        server = MetricsServer(args.listen_address, exposition, args.telemetry_path, first_poll.is_set)
    except ListenAddressError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server.start()
    log.info(
        "pg-advisory-lock-exporter %s listening on %s%s; %s",
        __version__, args.listen_address, args.telemetry_path, config.summary(),
    )
    poll_thread = threading.Thread(target=poller.run, args=(stop,), name="poller", daemon=True)
    poll_thread.start()
    probe_thread = threading.Thread(target=prober.run, args=(stop,), name="probe", daemon=True)
    probe_thread.start()
    while not stop.is_set():
        stop.wait(0.2)
    server.stop()
    poll_thread.join(timeout=5.0)
    probe_thread.join(timeout=5.0)
    log.info("stopped")
    return EXIT_OK
