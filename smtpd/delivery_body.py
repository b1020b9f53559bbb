"""The message a delivery writes: the delivery header lines, then the queued file.

The queue opened the file; its descriptor reached the delivery worker over two
SCM_RIGHTS hops (smtpd/fd_channel.py, docs/delivery.md).  Everything here reads it
with ``pread`` from offset 0: the open file description (and its offset) is shared
with every process that held the descriptor, so nobody relies on its position.
Readable after the worker dropped to the user: permissions are checked at open.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

CHUNK = 1 << 16
HEAD_LIMIT = 1 << 20        # the header block scanned for X-Spam, Delivered-To


class MessageBody:
    def __init__(self, prefix: bytes, fd: int) -> None:
        self.prefix = prefix
        self.fd = fd
        self.file_size = os.fstat(fd).st_size

    def __len__(self) -> int:
        return len(self.prefix) + self.file_size

    def file_chunks(self) -> Iterator[bytes]:
        """The queued file alone, in chunks."""
        offset = 0
        while offset < self.file_size:
            chunk = os.pread(self.fd, min(CHUNK, self.file_size - offset), offset)
            if not chunk:
                raise OSError(5, "message file shrank while being delivered")
            offset += len(chunk)
            yield chunk

    def chunks(self) -> Iterator[bytes]:
        if self.prefix:
            yield self.prefix
        yield from self.file_chunks()

    def head(self) -> bytes:
        """The start of the message, through the end of its header block (bounded)."""
        return self.prefix + read_head(self.fd)

    def write_to(self, out_fd: int) -> None:
        """Everything into ``out_fd`` (a file or a pipe): the file goes kernel-side
        (sendfile), no copy through this process."""
        _write_all(out_fd, self.prefix)
        offset = 0
        while offset < self.file_size:
            try:
                sent = os.sendfile(out_fd, self.fd, offset, self.file_size - offset)
            except OSError as exc:
                if exc.errno not in (22, 38):          # EINVAL/ENOSYS: copy by hand
                    raise
                for chunk in _chunks_from(self.fd, offset, self.file_size):
                    _write_all(out_fd, chunk)
                return
            if sent == 0:
                raise OSError(5, "message file shrank while being delivered")
            offset += sent


def read_head(fd: int) -> bytes:
    """The file's header block (through the first empty line), at most HEAD_LIMIT bytes."""
    buf = b""
    while len(buf) < HEAD_LIMIT:
        chunk = os.pread(fd, CHUNK, len(buf))
        if not chunk:
            break
        buf += chunk
        if b"\n\n" in buf or b"\r\n\r\n" in buf or buf.startswith((b"\n", b"\r\n")):
            break
    return buf


def _chunks_from(fd: int, offset: int, end: int) -> Iterator[bytes]:
    while offset < end:
        chunk = os.pread(fd, min(CHUNK, end - offset), offset)
        if not chunk:
            raise OSError(5, "message file shrank while being delivered")
        offset += len(chunk)
        yield chunk


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
