"""Allow `python -m sekisho …` (the same light dispatch as the console script)."""

from sekisho.entry import main

main()
