"""`python -m attnscope` (also what torchrun runs)."""

from attnscope.cli.app import main

main()
