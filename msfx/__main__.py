import sys

from msfx.cli import main

sys.exit(main())
