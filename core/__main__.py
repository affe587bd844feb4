"""`python -m core ...`: the headless CLI."""
from .cli import exit_process, main

exit_process(main())
