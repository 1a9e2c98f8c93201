"""The HTTP API: route table, app, chat, health handlers, parsing, images, OpenAPI, console, cache, metrics.

Never imports admin, daemon or llama_cpp; of the engine only its data types and front door (queue, GPU).
"""
