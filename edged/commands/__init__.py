"""Sub-commands of the ``edged`` CLI; every module here is picked up by :mod:`edged.cli`."""
