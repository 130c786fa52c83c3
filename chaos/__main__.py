"""python -m chaos: the truth test (chaos/run.py says what it runs and proves)."""

import sys

from chaos.run import main

if __name__ == "__main__":  # the workload's spawned workers import this module too
    sys.exit(main())
