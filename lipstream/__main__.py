"""`python -m lipstream`: the same CLI as the `lipstream` command."""

from lipstream.cli import main

main()
