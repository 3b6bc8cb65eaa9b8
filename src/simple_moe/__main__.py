"""Command line: `python -m simple_moe {demo,bench,check-build} [options]`.

Each subcommand forwards the rest of the command line to its module's `main(argv)`, so
`python -m simple_moe bench --shape 8,2,4096,14336 --tokens 1,16` hands `--shape ... --tokens ...` to the benchmark.
The modules are imported only when their subcommand runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("simple_moe.demo", "run a small MoE layer and compare it with the PyTorch reference"),
    "bench": ("simple_moe.bench", "benchmark the fused MoE layer against the reference implementations"),
    "check-build": ("simple_moe.check_build", "compile every Triton kernel variant for SM80/86/89/90 without a GPU"),
}


def _parser() -> argparse.ArgumentParser:
    epilog = "commands:\n" + "\n".join(f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items())
    epilog += "\n\nRun `python -m simple_moe COMMAND --help` for the options of a command."
    p = argparse.ArgumentParser(prog="python -m simple_moe", description="simple_moe: a fused Mixture-of-Experts layer "
                                "in Triton", epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=list(COMMANDS), help="what to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="options for the command")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv[:1] or [])  # prints help for -h, or the usage error, and exits
        parser.error("a command is required")
    ns = parser.parse_args(argv[:1])
    module = importlib.import_module(COMMANDS[ns.command][0])
    rc = module.main(argv[1:])
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
