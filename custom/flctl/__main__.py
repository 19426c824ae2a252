import sys

from flctl.cli import main

sys.exit(main())
