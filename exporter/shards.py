"""Shards: which targets of the config this exporter owns, when one process is not enough.

A target belongs to the shard that Lamping and Veach's jump consistent hash ("A Fast, Minimal
Memory, Consistent Hash Algorithm", 2014) gives for its key, the first 8 bytes of SHA-256 of the
target's name read big-endian. Both are defined to the bit, so the owner is the same in every
process, version and language, and anyone can compute it. Going from M to M+1 shards moves about
1/(M+1) of the targets, each to the new shard only: no target moves between two old shards.

A target's hold tracking lives in the exporter that polls it, so a target must stay with one
replica (hence not Prometheus's `hashmod` alone, which would let every replica poll every server).
kube-state-metrics shards the same way (`--shard`, `--total-shards`, its jump hash of the object's
UID in pkg/sharding, the ordinal from a StatefulSet's pod name).

Pure: the flags' values in, a Shard out. cli.py reads the flags and the address to advertise;
fleet.Runtime runs only the owned targets and answers `/sd` (`service_discovery`) and another
shard's `/probe` (`Shard.elsewhere`), which server.App routes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

# Lamping and Veach's linear congruential step (the 64-bit LCG of their paper), modulo 2**64.
_MULTIPLIER = 2862933555777941757
_MASK = (1 << 64) - 1
# A StatefulSet names its pods <statefulset>-<ordinal>.
_POD_ORDINAL = re.compile(r"-(0|[1-9][0-9]*)$")


class ShardError(Exception):
    """A shard flag that cannot be used: one line naming the flag."""


def jump_hash(key: int, buckets: int) -> int:
    """The bucket in [0, buckets) of a 64-bit key, exactly as the paper's C++ (double division)."""
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * _MULTIPLIER + 1) & _MASK
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def target_key(name: str) -> int:
    """A target's key: the first 8 bytes of SHA-256 of its name (UTF-8), big-endian unsigned."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def shard_of(name: str, total: int) -> int:
    """The shard (0-based) that owns the target name among total shards."""
    return jump_hash(target_key(name), total)


@dataclass(frozen=True)
class Shard:
    """This exporter's place: shard `ordinal` of `total` (0 of 1: it owns every target)."""

    ordinal: int = 0
    total: int = 1

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ShardError(f"--total-shards: {self.total} must be at least 1")
        if not 0 <= self.ordinal < self.total:
            raise ShardError(f"--shard: {self.ordinal} is not a shard of {self.total} "
                             f"(shards are numbered 0 to {self.total - 1})")

    def owns(self, name: str) -> bool:
        return self.total == 1 or shard_of(name, self.total) == self.ordinal

    def owner(self, name: str) -> int:
        return shard_of(name, self.total)

    def own(self, names: Iterable[str]) -> list[str]:
        """The names this shard owns, in their order."""
        return [name for name in names if self.owns(name)]

    def elsewhere(self, name: str) -> str:
        """Why another shard answers for name (the 404 of /probe): "target X belongs to shard 2 of 4"."""
        return f"target {name} belongs to shard {self.owner(name)} of {self.total}"

    def __str__(self) -> str:
        return f"shard {self.ordinal} of {self.total}"


def _integer(flag: str, value: str) -> int:
    text = str(value).strip()
    if not re.fullmatch(r"-?[0-9]+", text):
        raise ShardError(f"{flag}: {value!r} is not a whole number")
    return int(text)


def pod_ordinal(pod_name: str) -> int:
    """'lock-exporter-3' -> 3: the ordinal a StatefulSet gives the pod, at the end of its name."""
    match = _POD_ORDINAL.search(pod_name.strip())
    if match is None:
        raise ShardError(f"--shard.from-pod-name: POD_NAME {pod_name!r} does not end in -<ordinal> as a "
                         "StatefulSet's pods do (e.g. lock-exporter-3); set POD_NAME from the downward API "
                         "(metadata.name) or use --shard")
    return int(match.group(1))


def parse_shard(shard: str, total_shards: str, from_pod_name: bool, pod_name: str | None) -> Shard:
    """The shard flags' values (strings, as from the command line or the environment) -> a Shard."""
    total = _integer("--total-shards", total_shards)
    if total < 1:
        raise ShardError(f"--total-shards: {total} must be at least 1")
    if from_pod_name:
        if str(shard).strip() not in ("", "0"):
            raise ShardError("--shard and --shard.from-pod-name: give one of them, not both")
        if not pod_name:
            raise ShardError("--shard.from-pod-name: POD_NAME is not set (in a StatefulSet, set it from the "
                             "downward API: fieldRef metadata.name)")
        ordinal = pod_ordinal(pod_name)
        if ordinal >= total:
            raise ShardError(f"--shard.from-pod-name: POD_NAME {pod_name!r} is shard {ordinal}, but --total-shards is "
                             f"{total} (shards 0 to {total - 1}): more replicas than shards?")
        return Shard(ordinal, total)
    ordinal = _integer("--shard", shard)
    if ordinal < 0:
        raise ShardError(f"--shard: {ordinal} must be 0 or more")
    return Shard(ordinal, total)


def service_discovery(shard: Shard, names: Iterable[str], address: str, metrics_path: str = "/probe") -> bytes:
    """Prometheus's HTTP service discovery (http_sd_configs): one group per owned target, scraped
    at this shard's address on /probe with __param_target, instance = the target (as the alert
    rules' joins expect, and as the README's static relabeling makes it). The shard is a meta
    label (dropped after relabeling): a series keeps its identity when the shards change."""
    groups = [{"targets": [address],
               "labels": {"__metrics_path__": metrics_path, "__param_target": name, "instance": name,
                          "__meta_pg_advisory_lock_exporter_shard": str(shard.ordinal),
                          "__meta_pg_advisory_lock_exporter_total_shards": str(shard.total)}}
              for name in shard.own(names)]
    return json.dumps(groups).encode() + b"\n"


def advertised_address(external: str, listen: str, pod_ip: str | None, hostname: str) -> str:
    """The host:port `/sd` gives Prometheus for this exporter: --web.external-address when set;
    else POD_IP (a pod's own address, from the downward API) with the listen port; else the listen
    address when it names a host; else this machine's hostname with the listen port."""
    if external:
        return external
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if pod_ip:
        host = pod_ip
    elif host in ("", "0.0.0.0", "::"):
        host = hostname
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
