"""``paw serve``: an OpenAI-compatible server where every base program and compiled program is a model.

``app`` is the HTTP API, ``prepare`` checks a request and makes its engine requests,
``completions`` runs them and writes the bodies and events, ``reply`` reads a chat
reply's reasoning, answer and tool calls,
``runner`` loads the models and runs uvicorn, ``command`` is the CLI. The batching
itself is ``paw_mlx.engine``.
"""
