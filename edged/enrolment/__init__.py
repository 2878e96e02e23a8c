"""Enrolment from the field: the faces of ended tracks kept on the board, named later.

``store`` keeps, when ``enrolment.keep_faces`` is on, the best aligned crops of each ended
track (with their embeddings, camera, times and outcome) under ``<state_dir>/tracks``, 0600,
for ``keep_days`` and at most ``max_tracks``; ``guard`` refuses a track that would poison the
gallery (crops below the quality minimums, crops of more than one person, a look-alike of
someone enrolled); ``enrol`` adds a track's crops to a gallery file atomically (the running
daemon hot-swaps it like any gallery drop). ``edged tracks`` and the MQTT command
``<prefix>/command/enrol`` are the two ways in.
"""
