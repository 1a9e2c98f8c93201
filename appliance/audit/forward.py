"""Forwarding: a copy of each durable audit record to the local journald or syslog socket, never the network.

The host's existing forwarding (journal-upload, rsyslog) carries it on to the SIEM; the file stays the truth.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("appliance.audit.forward")


FORWARD_SOCKETS = {"journald": Path("/run/systemd/journal/socket"), "syslog": Path("/dev/log")}


class Forwarder:
    """Copies each durable record to the local journald or syslog socket (AF_UNIX datagrams only).

    The local file stays the source of truth: a forwarding failure is logged, never fails a request.
    """

    def __init__(self, kind: str, path: Path | None) -> None:
        self.kind = kind
        self.path = path or FORWARD_SOCKETS[kind]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sent = self.dropped = 0
        self._warned = 0.0

    def send(self, record: dict[str, Any], line: bytes) -> None:
        payload = self._journald(record, line) if self.kind == "journald" else self._syslog(record, line)
        try:
            self.sock.sendto(payload, str(self.path))
            self.sent += 1
        except OSError as exc:
            self.dropped += 1
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.warning(
                    "audit forwarding to %s failed (%s); %d records not forwarded so far",
                    self.path,
                    exc.strerror,
                    self.dropped,
                )

    @staticmethod
    def _journald(record: dict[str, Any], line: bytes) -> bytes:
        """journald's native protocol: KEY=value lines; the JSON record is the MESSAGE."""
        status = record.get("status")
        fields = {
            "MESSAGE": line.rstrip(b"\n").decode(),
            "SYSLOG_IDENTIFIER": "qwen-appliance-audit",
            "PRIORITY": "5" if isinstance(status, int) and status >= 400 else "6",
        }
        for key in ("event", "seq", "request_id", "client", "source_ip", "status", "prev"):
            if record.get(key) is not None:
                fields[f"QWA_{key.upper()}"] = str(record[key])
        return "".join(f"{k}={v}\n" for k, v in fields.items()).encode()

    @staticmethod
    def _syslog(record: dict[str, Any], line: bytes) -> bytes:
        """RFC 5424 (local0.info) with the JSON record as the message and key facts as structured data."""
        sd = " ".join(
            f'{k}="{record[k]}"' for k in ("event", "seq", "status", "client") if record.get(k) is not None
        )
        head = (
            f"<134>1 {record['ts']} {socket.gethostname()} qwen-appliance-audit {os.getpid()} "
            f"AUDIT [qwa@32473 {sd}] "
        )
        return head.encode() + line.rstrip(b"\n")
