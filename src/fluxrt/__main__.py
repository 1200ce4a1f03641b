"""`python -m fluxrt ...` runs the command line (`fluxrt.cli.main`)."""

from .cli import main

raise SystemExit(main())
