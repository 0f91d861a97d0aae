"""The ``fastprune`` command: argument parsing only; each sub-command calls the library."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _demo(args) -> int:
    from .synthetic import demo

    demo(epochs=args.epochs, num_samples=args.samples, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastprune", description="Dynamic dataset pruning with fused Triton kernels.")
    ap.add_argument("--version", action="version", version=f"fastprune {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train with and without pruning on a built-in noisy-label task")
    d.add_argument("--epochs", type=int, default=12)
    d.add_argument("--samples", type=int, default=20_000)
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.set_defaults(func=_demo)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, IndexError, FileNotFoundError) as e:  # user errors: one line, no traceback
        print(f"fastprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
