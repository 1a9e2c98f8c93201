"""The running service: serve wiring, HTTP protocol and deadlines, TLS listener, reload, sd_notify, hardening.

Never imports admin code (the `serve` command starts the daemon; nothing here knows the other commands).
"""
