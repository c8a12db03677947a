"""A plugin that calls ``sys.exit()`` while it is imported (exit code None, i.e. 0)."""
import sys

sys.exit()
