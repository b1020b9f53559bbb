"""A remote MX that records the exact bytes of each DATA, as they came off the wire
(aiosmtpd undoes dot-stuffing and splits lines its own way), and can misbehave at
STARTTLS: ``starttls="break"`` answers 220 then speaks plain text, so the client's
TLS handshake fails; ``starttls="refuse"`` answers 454."""
from __future__ import annotations

import socket
import threading

READ_TIMEOUT = 30
MAX_COMMANDS = 200
MAX_DATA = 10 << 20


class RawSink:
    def __init__(self, port: int, starttls: str | None = None) -> None:
        self.port = port
        self.starttls = starttls
        self.datas: list[bytes] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.threads: list[threading.Thread] = []

    def start(self) -> "RawSink":
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(8)
        self.sock.settimeout(0.5)
        self.running = True
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)
        return self

    def stop(self) -> None:
        self.running = False
        for t in self.threads:
            t.join(READ_TIMEOUT + 5)
        if self.sock is not None:
            self.sock.close()

    def _accept(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(READ_TIMEOUT)
        buf = bytearray()

        def line() -> bytes | None:
            while b"\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return None
                buf.extend(chunk)
            end = buf.index(b"\r\n")
            out = bytes(buf[:end])
            del buf[:end + 2]
            return out

        try:
            conn.sendall(b"220 raw.test ESMTP\r\n")
            for _ in range(MAX_COMMANDS):
                cmd = line()
                if cmd is None:
                    return
                verb = cmd.split(b" ", 1)[0].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-raw.test\r\n" + (b"250-STARTTLS\r\n" if self.starttls else b"")
                                 + b"250 8BITMIME\r\n")
                elif verb == b"STARTTLS" and self.starttls == "break":
                    conn.sendall(b"220 go ahead\r\n")
                    conn.recv(65536)            # the client's hello, then no TLS answer
                    conn.sendall(b"this is not a TLS server hello\r\n" * 4)
                    return
                elif verb == b"STARTTLS":
                    conn.sendall(b"454 4.7.0 TLS not available\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go\r\n")
                    while not (buf.endswith(b"\r\n.\r\n") or bytes(buf) == b".\r\n"):
                        chunk = conn.recv(65536)
                        if not chunk or len(buf) > MAX_DATA:
                            return
                        buf.extend(chunk)
                    with self.lock:
                        self.datas.append(bytes(buf))
                    buf.clear()
                    conn.sendall(b"250 2.0.0 recorded\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")
        except OSError:
            return
        finally:
            conn.close()

    @property
    def recorded(self) -> list[bytes]:
        with self.lock:
            return list(self.datas)
