"""One module per recipe, flat: each defines `Config` (its typed parameters) and `run(cfg, ctx) -> metrics`.

The registry (`llmrepro.core.registry`) lists them with their description and capabilities. A recipe module
imports only configs at module level (no torch), so validating the catalog stays fast; its heavy imports
happen inside `run`. No recipe imports another: what two recipes share lives in a lower layer.
"""
