"""python -m chaos: the truth test (chaos/run.py says what it runs and proves)."""

import sys

from chaos.run import main

sys.exit(main())
