"""Dependency audit from the package registry alone (run by `make check` after pip-audit).

pip-audit asks PyPI's per-release JSON (`/pypi/NAME/VERSION/json`) or OSV. Behind a registry
mirror that serves only the project JSON (`/pypi/NAME/json`), as on this project's build
machines, every package comes back "could not be audited" and pip-audit still exits 0. The
project JSON's `vulnerabilities` are those of the project's latest release, so this script
audits each installed distribution that IS the latest release with it, and lists the rest as
not audited here (with the version they lag). Exit status 1 on any known vulnerability, 2 when
the registry answered for nothing at all; the counts go to stdout.

    python .ci/audit.py [--index https://pypi.org/pypi] [--strict]

`--strict` also fails when an installed distribution could not be audited.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata as md
import json
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

SKIP = {"lipstream"}  # this project (editable)


@dataclass(frozen=True)
class Result:
    name: str
    installed: str
    latest: str | None  # None: the registry did not answer
    vulnerabilities: tuple[str, ...]  # ids, for the latest release

    @property
    def audited(self) -> bool:
        return self.latest is not None and _public(self.installed) == _public(self.latest)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _public(version: str) -> str:
    return version.split("+", 1)[0]  # 2.13.0+cpu is the 2.13.0 release


def installed() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and _norm(name) not in SKIP:
            out[_norm(name)] = dist.version
    return out


def query(index: str, name: str, version: str, timeout: float) -> Result:
    try:
        with urllib.request.urlopen(f"{index}/{name}/json", timeout=timeout) as resp:
            data = json.load(resp)
    except (urllib.error.URLError, TimeoutError, ValueError, OSError):
        return Result(name, version, None, ())
    vulns = tuple(
        str(v.get("id") or v.get("aliases") or "?")
        for v in data.get("vulnerabilities") or []
        if not v.get("withdrawn")
    )
    return Result(name, version, str(data.get("info", {}).get("version")), vulns)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", default="https://pypi.org/pypi")
    ap.add_argument("--timeout", type=float, default=15.0)
    ap.add_argument("--strict", action="store_true")
    args = ap.parse_args(argv)
    dists = installed()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = sorted(
            pool.map(lambda kv: query(args.index, kv[0], kv[1], args.timeout), dists.items()),
            key=lambda r: r.name,
        )
    audited = [r for r in results if r.audited]
    vulnerable = [r for r in audited if r.vulnerabilities]
    lagging = [r for r in results if r.latest is not None and not r.audited]
    unanswered = [r for r in results if r.latest is None]
    for r in vulnerable:
        print(f"VULNERABLE {r.name} {r.installed}: {', '.join(r.vulnerabilities)}")
    for r in lagging:
        print(f"not audited here: {r.name} {r.installed} (latest {r.latest})")
    for r in unanswered:
        print(f"not audited here: {r.name} {r.installed} (the registry did not answer)")
    print(
        f"audit: {len(results)} distributions, {len(audited)} audited (latest releases), "
        f"{len(vulnerable)} with known vulnerabilities, {len(lagging)} not the latest release, "
        f"{len(unanswered)} unanswered"
    )
    if vulnerable:
        return 1
    if results and not audited:
        print("audit: the registry answered for nothing; no audit was done", file=sys.stderr)
        return 2
    if args.strict and (lagging or unanswered):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
