"""``paw serve``: an OpenAI-compatible server where every base program and compiled program is a model.

``app`` is the HTTP API, ``completions`` turns requests into engine work and bodies,
``runner`` loads the models and runs uvicorn, ``command`` is the CLI. The batching
itself is ``paw_mlx.engine``.
"""
