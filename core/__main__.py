"""`python -m core ...`: the headless CLI (a SIGTERM'd command ends in ``main`` itself: ``core.cli.exit_process``)."""
import sys

from .cli import main

sys.exit(main())
