import sys

from seedbed.cli import main

sys.exit(main())
