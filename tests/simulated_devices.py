"""XLA flags that simulate CPU devices: set for the test session, and for its subprocesses.

A module of its own (not conftest.py) so tests import it by a name no other folder shadows.
"""

TEST_XLA_FLAGS = '--xla_force_host_platform_device_count={}'
NUM_DEVICES = 4
