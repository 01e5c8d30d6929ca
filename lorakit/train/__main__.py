"""`python -m lorakit.train ...` (e.g. under torchrun): the `lorakit` command line, its error handling included."""

from lorakit.cli import main

main()
