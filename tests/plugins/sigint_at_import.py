"""Stands in for a user pressing Ctrl-C while a slow plugin imports: the process sends itself
SIGINT, which must stop vitlab rather than be recorded as the plugin's failure."""
import os
import signal
import time

vitlab_api = 2  # the plugin API this module targets

os.kill(os.getpid(), signal.SIGINT)
for _ in range(100):  # the handler runs between bytecodes, almost at once
    time.sleep(0.01)
raise AssertionError("SIGINT was not delivered")
