"""Build glue for what pyproject.toml cannot say to every setuptools.

The license is an SPDX expression (PEP 639) for setuptools 77 and later;
Python 3.8's last setuptools (75) only knows the older field.
"""

import setuptools

if int(setuptools.__version__.split(".")[0]) >= 77:
    setuptools.setup(license_expression="BSD-3-Clause")
else:
    setuptools.setup(license="BSD-3-Clause")
