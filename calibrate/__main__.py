"""``python -m calibrate``: see calibrate/cli.py."""

import sys

from calibrate.cli import main

if __name__ == "__main__":
    sys.exit(main())
