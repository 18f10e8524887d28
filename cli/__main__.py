"""`python -m cli ...` is `klein-style ...`."""

import sys

from cli.main import main

sys.exit(main())
