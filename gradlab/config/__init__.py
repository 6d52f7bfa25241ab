"""What to run, as data (torch-free): the settings and their roles, specs (TOML), --set
overrides, sweeps, and every rule that ties settings together."""
