"""`python -m lorajax ...`: the `lorajax` command line."""

import sys

from lorajax._src.cli import main

if __name__ == "__main__":
  sys.exit(main())
