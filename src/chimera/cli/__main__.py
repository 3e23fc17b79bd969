"""`python -m chimera.cli …` runs the `chimera` command."""

from chimera.cli import main

main()
