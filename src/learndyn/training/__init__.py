"""Training: TRL recipes, the LearningDynamicsCallback, and run directories (see runs.py)."""
