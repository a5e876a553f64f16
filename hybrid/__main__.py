"""`python -m hybrid ...` is the `hybrid` command."""

import sys

from hybrid.cli.main import main

sys.exit(main())
