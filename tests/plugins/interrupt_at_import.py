"""A plugin that raises ``KeyboardInterrupt`` itself while it is imported (no Ctrl-C involved)."""
raise KeyboardInterrupt("raised by the plugin, not by the user")
