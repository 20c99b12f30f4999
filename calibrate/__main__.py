"""``python -m calibrate``: see calibrate/cli/main.py."""

import sys

from calibrate.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
