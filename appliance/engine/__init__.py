"""The engine: model loading, chat template, prompts, batched generation, the job queue and the GPU monitor.

The only package that imports llama_cpp; it never imports web, security, audit, daemon or admin code.
"""
