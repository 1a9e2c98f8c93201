"""The staff client (`ask`, `client setup`): the profile, the request and its streamed answer, exit codes.

Never imports the daemon's code (web, daemon, engine, audit, config): only appliance.errors, files and text.
"""
