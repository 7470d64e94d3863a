"""`python -m tuneforge` runs the command line."""

from tuneforge.cli import main

raise SystemExit(main())
