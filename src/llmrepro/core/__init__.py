"""The run engine: config, catalog, registry, runs and their provenance, references; no science, no torch at import."""
