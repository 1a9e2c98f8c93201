"""The policy: the settings table, typed policy, loading and validation, trusted files, live status, edits.

Imports only appliance.errors and appliance.files; never web, security, daemon, engine, audit or admin code.
"""
