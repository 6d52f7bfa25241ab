"""One optimizer step under an arm's policy (torch; knows nothing of trials or processes):
the engine, mixed precision (amp), GradCache, the optimizer and schedule, dropout keys, the
data-parallel replica, memory meters and the distances between gradients."""
