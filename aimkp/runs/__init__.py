"""What a run directory holds and how it is written: checkpoint directories
(:mod:`.checkpoints`), resumable state (:mod:`.state`), the run lock (:mod:`.lock`), the
output-directory policy (:mod:`.outdir`), signal handling (:mod:`.signals`), what ``--resume``
may change (:mod:`.resume_check`), and the logs: ``metrics.csv`` (:mod:`.metrics_log`),
``steps.csv`` (:mod:`.step_log`) and the ``--report-to`` reporter (:mod:`.reporting`).
:mod:`aimkp.train` builds on this package, which imports nothing of it."""
