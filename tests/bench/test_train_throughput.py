"""bench/train_throughput.py's reading of a failed case."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'bench'))
import train_throughput  # noqa: E402


def test_a_failed_case_reports_its_exception_not_the_notes_after_it():
  stderr = '''Traceback (most recent call last):
  File "train_throughput.py", line 3, in <module>
NotImplementedError: Unsupported sequence length Q 197, KV 197.
--------------------
For simplicity, JAX has removed its internal frames from the traceback of the following exception. Set JAX_TRACEBACK_FILTERING=off to include these.
'''
  assert (train_throughput.error_line(stderr)
          == 'NotImplementedError: Unsupported sequence length Q 197, KV 197.')
  assert train_throughput.error_line('killed\n') == 'killed'
  assert train_throughput.error_line('') == 'no output'
