import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


VERSION = re.search(
    r'^__version__\s*=\s*"([^"]+)"', read("tcpserver.py"), re.MULTILINE
).group(1)

setup(
    name="tcpserver",
    version=VERSION,
    description=(
        "A generic multithreaded TCP server: the CHICKEN tcp-server egg for "
        "Python, a drop-in for socketserver.ThreadingTCPServer"
    ),
    long_description=read("README.rst"),
    long_description_content_type="text/x-rst",
    author="tcpserver developers",
    license="BSD-3-Clause",
    py_modules=["tcpserver"],
    python_requires=">=3.8",
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Developers",
        "License :: OSI Approved :: BSD License",
        "Operating System :: POSIX",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.8",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Internet",
        "Topic :: System :: Networking",
    ],
)
