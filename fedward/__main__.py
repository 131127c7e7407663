"""`python -m fedward` is the `fedward` command."""

from fedward.cli import main

main()
