"""`python -m lorajax ...`: the `lorajax` command line."""

import sys

from lorajax._src.app.cli import main

if __name__ == "__main__":
  sys.exit(main())
