"""What a run directory holds: checkpoint directories (:mod:`.checkpoints`), resumable state
(:mod:`.state`) and the run lock (:mod:`.lock`). The loop's own helpers (signal handling, resume
option checks, metrics and step logs) live in :mod:`aimkp.train`, which builds on this package."""
