"""`python -m tagwriter` runs the command line."""

from tagwriter.cli import main

main()
