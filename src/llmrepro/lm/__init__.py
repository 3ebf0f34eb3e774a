"""Language-model plumbing: models (hub, local, tiny), datasets and fixtures, prompt templates."""
