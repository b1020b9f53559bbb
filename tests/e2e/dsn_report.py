"""Reading the delivery status notifications the daemon sends (bounces, delay and
success notices) in the end-to-end tests."""
from __future__ import annotations

import email
import email.policy
from pathlib import Path

from tests.conftest import wait_for
from tests.e2e.helpers import maildir_messages


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def report_groups(msg) -> list[dict]:
    """The field groups of the message/delivery-status part (per-message group first)."""
    assert msg.get_content_type() == "multipart/report"
    part = msg.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    return [dict(g.items()) for g in part.get_payload()]


def one_notice(base: Path, user: str) -> email.message.EmailMessage:
    msgs = wait_for(lambda: maildir_messages(base, user), 30, f"a notice in {user}'s Maildir")
    assert len(msgs) == 1, msgs
    return parse(msgs[0])
