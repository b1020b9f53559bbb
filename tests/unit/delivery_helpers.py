"""Messages as the delivery side gets them: a read-only descriptor of a file that is
already unlinked (the queue's open message), and its MessageBody."""
from __future__ import annotations

import os
import tempfile

from smtpd.delivery_body import MessageBody


def message_fd(data: bytes) -> int:
    fd, name = tempfile.mkstemp()
    os.write(fd, data)
    os.close(fd)
    ro = os.open(name, os.O_RDONLY)
    os.unlink(name)
    return ro


def body(data: bytes, prefix: bytes = b"") -> MessageBody:
    return MessageBody(prefix, message_fd(data))
