"""``gdscache``: the console script. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from gdscache import __version__
from gdscache.cli import bench, calibrate, gc, ls, stats, verify
from gdscache.cli.common import CLIError

SUBCOMMANDS = (bench, ls, stats, verify, gc, calibrate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gdscache",
        description="KV-cache storage for LLM serving. Start with: gdscache bench --path DIR",
    )
    parser.add_argument("--version", action="version", version=f"gdscache {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log gdscache's info messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure or bad data found, 2 bad usage)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"gdscache {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except (ValueError, TypeError) as exc:
        print(f"gdscache {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gdscache {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gdscache {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
