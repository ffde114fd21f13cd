"""The KVzap threshold sweep's earlier name (README commands of 2026-11-24 use it):
``python -m benchmarks.measured_sweep`` with ``--method kvzap``."""

import sys

from benchmarks.measured_sweep import main

if __name__ == "__main__":
    main(sys.argv[1:])
