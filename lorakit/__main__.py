"""`python -m lorakit ...`: the same command line as the `lorakit` script."""

from lorakit.cli import main

main()
