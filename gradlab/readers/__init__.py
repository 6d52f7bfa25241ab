"""Reading runs (torch-free): compare, pivot, plots and report read only what record wrote,
so they work on old runs and on runs from other machines."""
