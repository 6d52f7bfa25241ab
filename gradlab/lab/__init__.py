"""Running experiments: setups, preflight, arms and their random state, observers,
probing, lockstep trials, the worker pool and the ranks of a data-parallel run."""
