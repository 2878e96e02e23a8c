"""edged: on-device face recognition daemon.

The daemon is a flow of stages, one module each::

    capture -> detect -> align -> embed -> match -> track -> publish

Each stage hands a plain data type (see :mod:`edged.types`) to the next.
"""

__version__ = "0.1.0"
