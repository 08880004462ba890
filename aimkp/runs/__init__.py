"""Run infrastructure beside the training loop: checkpoint directories (:mod:`.checkpoints`),
resumable state (:mod:`.state`), the run lock (:mod:`.lock`), signal handling (:mod:`.signals`),
resume option checks (:mod:`.resume_check`) and the metrics / step logs (:mod:`.metrics_log`,
:mod:`.step_log`)."""
