"""Visual search over a shop catalogue with a trained model: index, query, serve, export.

See docs/search.md. `python -m fashion_jax.search --help` lists the commands.
"""
