"""A plugin that calls ``sys.exit()`` while it is imported (exit code None, i.e. 0)."""
import sys

vitlab_api = 2  # the plugin API this module targets

sys.exit()
