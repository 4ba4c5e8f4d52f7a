"""Intake: taking mail out of mailboxes and off the SMTP listener, safely.

mbox.py and maildir.py drain mailboxes, smtp.py is the listener, files.py the
file-safety rules they share (docs/security.md P13-P15); pipe.py takes the one message
`mailsh deliver` gets on stdin.
"""
