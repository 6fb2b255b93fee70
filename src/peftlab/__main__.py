"""python -m peftlab: the command line."""

from .cli import main

raise SystemExit(main())
