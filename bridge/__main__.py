"""`python -m bridge` runs the command line."""

from bridge.cli.main import main

raise SystemExit(main())
