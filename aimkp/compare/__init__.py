"""``aimkp compare``: several methods trained on the same data and scored side by side.

A method is a :class:`~aimkp.train.TrainConfig` variant (:mod:`.methods`); :mod:`.run` trains
each one (:func:`aimkp.train.loop.train`) and scores it with :mod:`aimkp.eval`. It sits above
both packages, so that :mod:`aimkp.eval` (which the training loop uses to validate) never
imports the training loop. Submodules are imported on use.
"""
