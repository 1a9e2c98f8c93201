"""qwen-appliance: a private Qwen3-VL vision-language appliance behind mutual TLS and bearer tokens."""

__version__ = "0.1.0"
