"""The one compiled part: data_pipelines._resample, the input pipeline's antialiased resize.

Everything else is declared in pyproject.toml.
"""

import os

from setuptools import Extension, setup

setup(ext_modules=[
    Extension('data_pipelines._resample', ['data_pipelines/_resample.c'],
              extra_compile_args=[] if os.name == 'nt' else ['-O3']),
])
