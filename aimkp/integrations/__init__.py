"""AimKP inside other training frameworks (:mod:`.transformers`: ``transformers.Trainer``).

Imported only when used: ``from aimkp.integrations.transformers import AimKPTrainer``.
"""
