"""A plugin that raises ``KeyboardInterrupt`` itself while it is imported (no Ctrl-C involved)."""

vitlab_api = 2  # the plugin API this module targets
raise KeyboardInterrupt("raised by the plugin, not by the user")
