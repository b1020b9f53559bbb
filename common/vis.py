"""Visible forms of untrusted text for log lines (OpenSMTPD passes such text
through strnvis(3) before it logs it).

Every log line that carries text from a client (SMTP, control, filters, tables)
passes that text through ``log_text`` so that NUL, CR, LF, ESC and other control
or non-ASCII bytes can never forge or corrupt a log line.
"""
from __future__ import annotations


def log_text(text: str | bytes) -> str:
    """Printable form of untrusted text in a log line, as strnvis(VIS_WHITE) makes it:
    blanks, control and non-ASCII bytes in octal (``\\040``), backslash doubled."""
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
    out = []
    for byte in data:
        if byte == 0x5C:
            out.append("\\\\")
        elif 0x21 <= byte <= 0x7E:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03o}")
    return "".join(out)
