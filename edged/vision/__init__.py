"""What one picture holds: find faces, align them, judge them, embed them.

The stages a frame goes through before a name is looked up, each usable on its own (the
``edged faces``/``compare``/``embed`` commands and the daemon share them):

``imageio`` (decode, colour order) -> ``motion`` (is anything moving?) -> ``detect``
(MTCNN: boxes and landmarks; ``boxes``: suppression and box arithmetic) -> ``align`` (the
112x112 crop) -> ``quality`` (sharpness, pose, size) -> ``liveness`` (a photo or a screen?) ->
``embed`` (the unit vector), and ``pipeline``, which runs them in order on one picture. They
take and return the plain types of ``edged.types`` and never import the daemon.
"""
