"""Allow `python -m sekisho`."""

from sekisho.cli import main

main()
