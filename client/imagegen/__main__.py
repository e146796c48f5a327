"""``python -m imagegen``: the ``imagegen`` command."""

import sys

from imagegen.cli import main

sys.exit(main())
