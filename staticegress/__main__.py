"""`python -m staticegress`: the same program as the `staticegress` command."""

import sys

from staticegress.cli.main import main

sys.exit(main())
