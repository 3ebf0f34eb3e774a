"""Representations: activation caches, probes and interventions."""
