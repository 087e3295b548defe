import sys

from arlab.cli import main

sys.exit(main())
