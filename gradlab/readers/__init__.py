"""Reading runs (torch-free): compare, the compact table, plots and their drawing, and the
report read only what record wrote, so they work on old runs and on runs from other machines."""
