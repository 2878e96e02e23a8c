"""Files that arrive over the air: model sets and galleries, checked before they are used.

``drops`` (:class:`~edged.ota.drops.DropManager`) watches the drop directory and the gallery path
and handles each file off the hot path, with its parts: ``modeldrops`` (manifests and models),
``gallerydrop`` (the gallery path), ``probation`` (the swap and its probation) and
``inprogress`` (the held-back embedder and the waiting manifests, kept across restarts).
``intake`` reads a dropped file safely, ``modelcheck`` checks and self-tests a model, ``store``
keeps what lasts across restarts under ``paths.state_dir``. ``modelset`` builds the set in
service (models and gallery), swaps it, confirms or rolls it back; ``galleryholder`` is the
gallery in service (its private snapshots, the last good one); both rest on ``hotswap``, the
one mechanism that builds and checks off the hot path and swaps one reference, so that readers
never see a half state.
"""
