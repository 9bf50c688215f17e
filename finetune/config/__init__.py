"""The recipe: schema (typed sections), load (YAML + overrides + every error at once), specs (recipe -> datasets)."""
