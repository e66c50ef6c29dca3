"""Training on Ray Train: config → model → DDP worker loop → checkpoints → MLflow.

``pipeline train`` / ``python -m pipeline.train`` load a ``TrainConfig``
(``config.py``) and call ``launch.fit``; every worker runs
``loop.train_loop_per_worker``; rank 0 tracks the job in MLflow (``tracking.py``).
"""
