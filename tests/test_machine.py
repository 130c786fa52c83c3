"""`make test` changes nothing the machine has installed: what the tests need and the machine
lacks is unpacked into the project's cache (tools/fetch.py), and a package is installed only when
apt's simulation shows that no installed one would be upgraded, downgraded or removed."""

from __future__ import annotations

import os

import pytest

from tools.fetch import DPKG_BEFORE, Action, installed_packages, parse_simulation, refusals

UPGRADE = ("Inst postgresql-15 [15.18-0+deb12u1] (15.20-0+deb12u1 Debian-Security:12/oldstable-security [amd64])")
NEW = "Inst postgresql-15-partman (4.7.2-1 Debian:12.15/oldstable [amd64])"


def test_every_package_installed_before_the_set_up_is_installed_in_the_same_version() -> None:
    if not DPKG_BEFORE.exists():
        pytest.skip(f"no {DPKG_BEFORE}: `make tools` writes it before it does anything")
    before = DPKG_BEFORE.read_text().splitlines()
    now = set(installed_packages())
    changed = [line for line in before if line not in now]
    assert not changed, f"changed or removed since {DPKG_BEFORE} was written: {changed}"


def test_an_inst_of_an_installed_package_is_an_upgrade_and_is_refused() -> None:
    actions = parse_simulation(f"NOTE: This is only a simulation!\n{UPGRADE}\n{NEW}\nConf postgresql-15 (15.20-0+deb12u1)\n",
                               newer=lambda a, b: False)
    assert actions == [Action("upgrade", "postgresql-15", "15.18-0+deb12u1", "15.20-0+deb12u1"),
                       Action("install", "postgresql-15-partman", None, "4.7.2-1")]
    assert refusals(actions) == ["upgrade postgresql-15 15.18-0+deb12u1 -> 15.20-0+deb12u1"]


def test_a_downgrade_and_a_removal_are_refused_and_new_packages_are_not() -> None:
    text = ("Inst libpq5 [15.20-0+deb12u1] (15.18-0+deb12u1 Debian:12.15/oldstable [amd64]) []\n"
            "Remv login [1:4.13+dfsg1-1+deb12u1]\n"
            "Inst chromium (156.0.8078.129-1~deb12u1 Debian:12.15/oldstable [amd64])\n")
    actions = parse_simulation(text, newer=lambda a, b: a.startswith("15.20"))
    assert [a.kind for a in actions] == ["downgrade", "remove", "install"]
    assert refusals(actions) == ["downgrade libpq5 15.20-0+deb12u1 -> 15.18-0+deb12u1", "remove login 1:4.13+dfsg1-1+deb12u1"]
    assert refusals(parse_simulation(NEW)) == []


@pytest.mark.skipif(not os.path.exists("/usr/bin/dpkg"), reason="dpkg compares Debian versions")
def test_versions_are_compared_as_dpkg_compares_them() -> None:
    (action,) = parse_simulation("Inst erlang-base [1:25.2.3+dfsg-1+deb12u4] (1:25.2.3+dfsg-1+deb12u10 x [amd64])")
    assert action.kind == "upgrade"  # a string comparison would call u10 older than u4
    (action,) = parse_simulation("Inst erlang-base [1:25.2.3+dfsg-1+deb12u10] (1:25.2.3+dfsg-1+deb12u4 x [amd64])")
    assert action.kind == "downgrade"
