import sys

from msfx.cli import entry

sys.exit(entry())
