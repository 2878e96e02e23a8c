"""Metadata lives in setup.cfg; this adds the one optional C extension.

``edged.gallery._scan`` (the float16 gallery scan) is built when a C compiler and the Python headers
are there; if it does not build, the install goes on and edged uses its numpy/OpenCV path.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("edged.gallery._scan", ["edged/gallery/_scan.c"],
                             depends=["edged/gallery/_scan_kernel.h"],
                             extra_compile_args=["-O3"], optional=True)])
