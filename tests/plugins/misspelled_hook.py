"""A plugin whose hook name is misspelled (singular ``component``): it must fail at start-up
rather than silently register nothing."""
import vitlab


@vitlab.hookimpl
def vitlab_register_component(register):
    raise AssertionError("never called")
