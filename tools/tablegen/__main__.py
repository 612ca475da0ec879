"""`python -m tools.tablegen`: regenerate (or `--check`) the method table and docs/methods.md."""

import sys

from tools.tablegen.generate import main

sys.exit(main())
