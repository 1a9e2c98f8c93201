"""Who may ask what: the gate, identity and scopes, request state, rate limits, TLS, cert ids, tokens, PKI.

Never imports the engine, the web handlers (only the route table, web.routes), admin or daemon code.
"""
