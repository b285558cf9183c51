"""`python -m vsc` runs the CLI."""
import sys

from vsc.cli import main

sys.exit(main())
