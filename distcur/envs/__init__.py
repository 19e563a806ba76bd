"""Simulated environments as arrays: MetaWorld v3 (MT1 tasks, scripted experts, their noise),
episode generation (:mod:`distcur.envs.generation`) and batched policy rollouts
(:mod:`distcur.envs.rollouts`). No store, no Ray: a caller hands in an executor to spread work."""
