"""``python -m bench <scenario> [options]``; ``python -m bench`` alone runs every scenario with defaults.

A scenario is a module ``bench.<name>`` (or an object in one: ``"bench.p1:p1a"``) with ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). Add a new one to ``SCENARIOS``.
``python -m bench all`` runs the performance scenarios (``PERFORMANCE``) at their defaults.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module; keep in the order `python -m bench` (no arguments) runs them.
SCENARIOS: dict[str, str] = {
    "pool": "bench.pool",
    "webhook_latency": "bench.webhook_latency",
    "p1a": "bench.p1:p1a",
    "p1b": "bench.p1:p1b",
    "p2": "bench.p2",
    "p3": "bench.p3",
    "p4": "bench.p4",
    "p5": "bench.p5",
    "p6": "bench.p6",
    "fairness": "bench.fairness",
    "waiters": "bench.waiters",
    "list_latency": "bench.list_latency",
    "replication": "bench.replication",
    "redis_cost": "bench.redis_cost",
    "redis_client": "bench.redis_client",
}
# what `python -m bench all` runs: the performance targets of bench/README.md, at their default sizes
PERFORMANCE = ("p1a", "p1b", "p2", "p3", "p4", "p5", "p6")


def _load(path: str) -> object:
    module, _, attribute = path.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    modules = {name: _load(path) for name, path in SCENARIOS.items()}
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="scenario", metavar="scenario")
    for name, module in modules.items():
        module.add_arguments(sub.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION))
    if not argv:
        status = 0
        for name, module in modules.items():
            status |= module.run(parser.parse_args([name]))
        return status
    if argv == ["all"]:
        status = 0
        for name in PERFORMANCE:
            status |= modules[name].run(parser.parse_args([name]))
        return status
    args = parser.parse_args(argv)
    return modules[args.scenario].run(args)


if __name__ == "__main__":
    sys.exit(main())
