"""``python -m ds4nb``: the same as the ``ds4nb`` command."""

import sys

from ds4nb.cli import main

sys.exit(main())
