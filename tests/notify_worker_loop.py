"""A worker that does nothing but the notify sweep, as fast as it can (for kill -9 tests)."""

import sys
import time

from appliance.core import config
from appliance.notify import outbox

cfg = config.load(sys.argv[1])
while True:
    outbox.sweep(cfg)
    time.sleep(0.02)  # pacing of the loop, as the real worker's ticker paces its sweeps
