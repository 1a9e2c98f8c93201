"""The `qwen-appliance` command: the entry point (cli) and one module per command group (token, model, ...).

Nothing imports admin code (the daemon least of all); admin never imports llama_cpp, only engine modules.
"""
