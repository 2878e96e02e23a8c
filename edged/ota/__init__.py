"""Files that arrive over the air: model sets and galleries, checked before they are used.

``drops`` watches the drop directory and validates each file off the hot path; ``hotswap``
holds the gallery and swaps one reference so that readers never see a half state.
"""
