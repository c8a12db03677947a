"""A plugin whose hook name is misspelled (singular ``component``): it must fail at start-up
rather than silently register nothing."""
import vitlab

vitlab_api = 2  # the plugin API this module targets


@vitlab.hookimpl
def vitlab_register_component(register):
    raise AssertionError("never called")
