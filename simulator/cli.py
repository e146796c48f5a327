"""Command line: `python -m simulator [options]`; every option also reads a SIM_* environment variable."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import fields

from simulator.config import FAULT_KINDS, IMAGE_FORMATS, SimConfig
from simulator.server import make_server

_DESCRIPTION = """\
Simulated Gemini image-generation gateway: POST /v1/images/generations.
Test endpoints: GET /_sim/stats, GET /_sim/calls, POST /_sim/reset, GET /_sim/images/<id>.
Script calls from a text part: [sim key=K script=a,b,c shape=S format=png|jpeg delay_ms=N hang_s=N
retry_delay=0.2s] (see simulator/README.md). Command-line options override SIM_* variables."""


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The argument parser, with defaults taken from env."""
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def option(flag: str, kind: type, default: str | None, help_text: str, **extra: object) -> None:
        variable = "SIM_" + flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(
            flag,
            type=kind,
            default=env.get(variable, default),
            help=f"{help_text} [env {variable}; default: %(default)s]",
            **extra,
        )

    option("--host", str, "127.0.0.1", "interface to listen on")
    option("--port", int, "8100", "port to listen on (0 picks a free one)")
    option("--api-key", str, None, "require 'Authorization: Bearer KEY' (401 otherwise)")
    option("--seed", int, "0", "seed for random faults and latency")
    option("--latency-ms", float, "0", "mean latency of a call")
    option("--latency-jitter-ms", float, "0", "uniform jitter (+/-) around the mean latency")
    option("--image-bytes", int, "0", "approximate encoded image size; 0 = as small as possible")
    option("--format", str, "png", "image format", choices=IMAGE_FORMATS)
    for kind in FAULT_KINDS:
        option(f"--fault-{kind}", float, "0", f"probability of a random '{kind}' outcome")
    option("--retry-delay-s", float, "1", "retryDelay put in 429 bodies")
    option("--hang-s", float, "30", "how long a 'timeout' outcome holds the request before a 504")
    option("--log", str, None, "append the per-call log to FILE instead of stderr", metavar="FILE")
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """SimConfig from parsed arguments (raises ValueError on invalid values)."""
    renamed = {"image_format": "format"}
    values = {f.name: getattr(args, renamed.get(f.name, f.name)) for f in fields(SimConfig)}
    return SimConfig(**values)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] = os.environ) -> None:
    """Parse options, start the server and serve until interrupted or terminated."""
    parser = build_parser(env)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    handler = logging.FileHandler(args.log) if args.log else logging.StreamHandler(sys.stderr)
    log_format = "%(asctime)s %(levelname)s %(name)s %(message)s"
    logging.basicConfig(level=logging.INFO, format=log_format, handlers=[handler])
    server = make_server(args.host, args.port, config)
    signal.signal(signal.SIGTERM, _exit)
    print(f"simulator listening on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)
