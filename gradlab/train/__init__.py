"""One optimizer step under an arm's policy (torch; knows nothing of trials or processes):
the engine, its precision and GradCache paths, dropout keys, the data-parallel replica,
memory meters and the distances between gradients."""
