"""Model files: the known-good manifest, first-install pins, the bounded GGUF header reader, Hub, install.

Never imports admin or daemon code (the `model` command group drives it), and never llama_cpp.
"""
