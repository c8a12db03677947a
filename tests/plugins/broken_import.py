"""A plugin whose import fails (a missing dependency)."""
raise ImportError("No module named 'vitlab_testplugin_missing_dependency'")
