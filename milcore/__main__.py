"""``python -m milcore`` runs the command line."""

from milcore.cli import main

raise SystemExit(main())
