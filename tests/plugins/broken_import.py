"""A plugin whose import fails (a missing dependency)."""

vitlab_api = 2  # the plugin API this module targets
raise ImportError("No module named 'vitlab_testplugin_missing_dependency'")
