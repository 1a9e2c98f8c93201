"""The engine: model loading, chat template, prompts, batched generation, the job queue and the GPU monitor.

Only this package imports llama_cpp (bindings.py alone); it never imports web, security, audit, daemon, admin.
"""
