"""`python -m hybrid ...` is the `hybrid` command."""

import sys

from .cli import main

sys.exit(main())
