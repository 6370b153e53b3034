"""The one compiled part: data_pipelines._resample, the input pipeline's antialiased resize.

Everything else is declared in pyproject.toml.
"""

import os

from setuptools import Extension, setup

# optional: where it cannot be compiled the package still installs, and the input pipeline
# resizes with TensorFlow's kernel instead (the same pixels, about five times slower; it logs a
# warning).
setup(ext_modules=[
    Extension('data_pipelines._resample', ['data_pipelines/_resample.c'],
              extra_compile_args=[] if os.name == 'nt' else ['-O3'], optional=True),
])
