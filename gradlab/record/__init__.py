"""The run directory (torch-free): the schema of its tables, the verdict rule, the store
that writes and reads it."""
