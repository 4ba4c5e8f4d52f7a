"""Neutral mail plumbing that both the client and the server use (docs/architecture.md).

Read-only scanning of an mbox or a Maildir and waking up when one changes. Nothing here
moves, truncates or deletes mail: the server's destructive intake lives in
:mod:`mailsh.server` and builds on these pieces. The mails themselves are built and read
in :mod:`mailsh.mail.message`, and handed to an SMTP server or a local sendmail through
:mod:`mailsh.mail.transport` (with :mod:`~mailsh.mail.smtp` and :mod:`~mailsh.mail.sendmail`).
"""
