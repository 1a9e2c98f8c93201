"""The audit trail: the MAC-chained log, its forwarding and digests, the per-request record, refusals, verify.

Never imports the engine's internals (only engine.types), the daemon or admin code: both drive it.
"""
