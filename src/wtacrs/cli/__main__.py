import sys

from wtacrs.cli import main

sys.exit(main())
