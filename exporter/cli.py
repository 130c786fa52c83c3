"""Flags, logging, signals and exit codes; wires config -> poller -> exposition -> server."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence

import psycopg

from . import __version__, locksview, logs
from .ages import counted
from .config import ConfigError, Fleet, load_fleet
from .dsn import error_line, server_name
from .fleet import Runtime
from .logs import describe_exception
from .memory import take_over_full_passes
from .server import ListenAddressError, MetricsServer
from .shards import Shard, ShardError, advertised_address, parse_shard
from .webconfig import WebConfig, load_web_config

log = logging.getLogger(__name__)

DEFAULT_PORT = 10105
ENV_PREFIX = "PG_ADVISORY_LOCK_EXPORTER_"

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2
SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


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
    flag("--web.config.file", "", "TLS and basic auth config, exporter-toolkit format", dest="web_config_file", metavar="PATH")
    flag("--web.telemetry-path", "/metrics", "path of the metrics", dest="telemetry_path", metavar="PATH")
    flag("--log.level", "info", "log level: " + "|".join(logs.LEVELS), dest="log_level", metavar="LEVEL")
    flag("--log.format", "logfmt", "log format: " + "|".join(logs.FORMATS), dest="log_format", metavar="FORMAT")
    flag("--shard", "0", "this exporter's shard (0-based): it polls and serves only the targets the jump hash of "
         "their names gives it", dest="shard", metavar="N")
    flag("--total-shards", "1", "how many shards the config's targets are spread over", dest="total_shards", metavar="M")
    parser.add_argument(
        "--shard.from-pod-name", dest="shard_from_pod_name", action="store_true",
        default=_env_bool("--shard.from-pod-name"),
        help="take the shard from the ordinal at the end of POD_NAME, as a StatefulSet names its pods "
             f"(lock-exporter-3: shard 3), beside --total-shards (env {env_name('--shard.from-pod-name')})",
    )
    flag("--web.external-address", "", "host:port /sd gives Prometheus for this exporter (empty: POD_IP with the "
         "listen port, else the listen address, else the hostname)", dest="external_address", metavar="HOST:PORT")
    parser.add_argument(
        "--check-config", action="store_true", default=_env_bool("--check-config"),
        help=f"validate the config (no database needed), print a summary and exit (env {env_name('--check-config')})",
    )
    parser.add_argument(
        "--web.enable-lifecycle", dest="enable_lifecycle", action="store_true", default=_env_bool("--web.enable-lifecycle"),
        help=f"allow POST /-/reload to reload the config (env {env_name('--web.enable-lifecycle')})",
    )
    parser.add_argument(
        "command", nargs="?", choices=["locks"],
        help="locks: print every advisory lock in the cluster now, and exit (with --watch: refresh like top)",
    )
    parser.add_argument("--json", action="store_true", help="with locks: print JSON, for scripts")
    parser.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                        help="with locks: refresh every SECONDS (default 2) until Ctrl-C")
    parser.add_argument("--target", metavar="NAME", help="with locks and a config of targets: the target to show")
    parser.add_argument("--version", action="version", version=f"pg-advisory-lock-exporter {__version__}")
    return parser


def _check_choice(parser: argparse.ArgumentParser, flag: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        parser.error(f"{flag}: {value!r} is not one of {', '.join(choices)}")


def show_locks(fleet: Fleet, target: str | None, as_json: bool, watch: float | None) -> int:
    """The locks command: one line of error (naming the server) and exit 1 if it cannot read."""
    if fleet.single:
        config = fleet.targets[0]
    else:
        config = fleet.target(target or "")  # type: ignore[assignment]
        if config is None:
            print(f"locks: {'unknown target ' + repr(target) if target else 'name a target'} "
                  f"(--target NAME; known: {', '.join(fleet.names)})", file=sys.stderr)
            return EXIT_CONFIG
    try:
        return locksview.run(config, as_json, watch)
    except KeyboardInterrupt:
        return EXIT_OK
    except psycopg.Error as exc:
        print(f"locks: cannot read {server_name(config.dsn)}: {error_line(exc, config.dsn)}", file=sys.stderr)
        return EXIT_CONFIG


def print_config_error(exc: ConfigError) -> None:
    """Every problem, one line each, located: 'config.yaml: locks[3].key: ...'."""
    for detail in exc.details:
        print(f"{exc.source}: {detail}", file=sys.stderr)


class Reloader:
    """Loads the config file again (SIGHUP, POST /-/reload): a bad one is refused, every problem
    logged, and the running one kept. One reload at a time: the signal and HTTP both ask."""

    def __init__(self, path: str, runtime: Runtime) -> None:
        self._path = path
        self._runtime = runtime
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        with self._lock:
            try:
                fleet = load_fleet(self._path)
            except ConfigError as exc:
                for detail in exc.details:
                    log.error("config reload refused: %s: %s", exc.source, detail)
                self._runtime.reload_result(False)
                return False
            except Exception as exc:  # noqa: BLE001 - a reload that breaks is a refused reload, seen
                return _reload_broke(self._runtime, exc, "the running config stays")
            try:
                self._runtime.apply(fleet)
            except ShardError as exc:  # refused before anything changed
                log.error("config reload refused: %s: %s; the running config stays", self._path, exc)
                self._runtime.reload_result(False)
                return False
            except Exception as exc:  # noqa: BLE001 - a reload that breaks is a refused reload, seen
                return _reload_broke(self._runtime, exc, "the targets already changed keep the new config")
            self._runtime.reload_result(True)
            log.info("config reloaded: %s", fleet.summary())
            return True


def _reload_broke(runtime: Runtime, exc: BaseException, what_stays: str) -> bool:
    log.error("config reload failed: %s; %s", describe_exception(exc), what_stays)
    log.debug("config reload failed", exc_info=exc)
    runtime.reload_result(False)
    return False


def shard_summary(fleet: Fleet, shard: Shard) -> str:
    """--check-config's word on sharding: which targets this shard owns."""
    own = shard.own(fleet.names)
    # "owns 1 of 1 target", "owns 0 of 2 targets": the noun agrees with the total it follows.
    return f"{shard} owns {len(own)} of {counted(len(fleet.names), 'target')}: {', '.join(own) or 'none'}"


def serve(args: argparse.Namespace, fleet: Fleet, web: WebConfig, shard: Shard = Shard()) -> int:
    """Run until SIGTERM/SIGINT: the targets' pollers and probes, the HTTP server, reloads."""
    # A poll runs a few ms of Python per 1,000 locks; handing the GIL over every 1 ms instead of
    # 5 ms keeps a scrape that arrives meanwhile from waiting for it (the benchmark's p95).
    sys.setswitchinterval(0.0002)
    take_over_full_passes()  # paced full passes of the cyclic collector only (memory.py)
    runtime = Runtime(fleet, args.telemetry_path, shard)
    reloader = Reloader(args.config_file, runtime)
    advertise = advertised_address(args.external_address, args.listen_address, os.environ.get("POD_IP"),
                                   socket.gethostname())
    try:
        server = MetricsServer(args.listen_address, runtime, args.telemetry_path,
                               reloader if args.enable_lifecycle else None, web, advertise)
    except ListenAddressError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    # Signals are taken by the main loop with sigwait, not by handlers: a handler runs in the middle
    # of whatever the main thread is doing, and one that sets a threading.Event there can deadlock
    # on the event's own lock (the main loop waiting on it), after which no signal, not even
    # SIGTERM, is ever handled. Blocked here, before any thread starts, they stay blocked in every
    # thread, so they are only ever delivered to this sigwait.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    runtime.start()
    server.start()
    log.info("pg-advisory-lock-exporter %s listening on %s%s; %s",
             __version__, args.listen_address, args.telemetry_path, fleet.summary())
    if shard.total > 1:
        log.info("%s; service discovery at /sd gives %s", shard_summary(fleet, shard), advertise)
    while (signum := signal.sigwait(SIGNALS)) == signal.SIGHUP:
        log.info("received SIGHUP, reloading %s", args.config_file)
        reloader()
    log.info("received %s, stopping", signal.Signals(signum).name)
    server.stop()
    runtime.stop()
    log.info("stopped")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_choice(parser, "--log.level", args.log_level, logs.LEVELS)
    _check_choice(parser, "--log.format", args.log_format, logs.FORMATS)
    if args.command != "locks" and (args.json or args.watch is not None or args.target):
        parser.error("--json, --watch and --target go with the locks command: pg-advisory-lock-exporter locks --json")
    if not args.telemetry_path.startswith("/"):
        parser.error(f"--web.telemetry-path: {args.telemetry_path!r} must start with /")
    try:
        shard = parse_shard(args.shard, args.total_shards, args.shard_from_pod_name, os.environ.get("POD_NAME"))
    except ShardError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)  # one line, and the exit status of any bad flag
        return EXIT_USAGE
    logs.setup(args.log_level, args.log_format)
    try:
        fleet = load_fleet(args.config_file)
        web = load_web_config(args.web_config_file) if args.web_config_file else WebConfig()
    except ConfigError as exc:
        print_config_error(exc)
        return EXIT_CONFIG
    if fleet.single and shard.total > 1:
        print(f"--total-shards: {args.config_file} watches one server (dsn): sharding spreads targets (targets:) "
              "over replicas", file=sys.stderr)
        return EXIT_USAGE
    if args.check_config:
        print(f"{args.config_file}: ok: {fleet.summary()}")
        if shard.total > 1:
            print(f"{args.config_file}: {shard_summary(fleet, shard)}")
        return EXIT_OK
    if args.command == "locks":
        return show_locks(fleet, args.target, args.json, args.watch)
    return serve(args, fleet, web, shard)
