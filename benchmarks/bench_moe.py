"""The benchmark as a script: `python benchmarks/bench_moe.py [options]` is `python -m simple_moe bench [options]`.

Works from a checkout without installing the package (it puts ../src on the path when simple_moe is not importable).
See `simple_moe.bench` (or `--help`) for what it measures and writes.
"""
import os
import sys

try:
    import simple_moe  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from simple_moe.bench import main

if __name__ == "__main__":
    sys.exit(main())
