"""Keys and trust: the gpg wrapper, identities, signing and encryption, the trust store.

Knows no mail: nothing here imports mailsh.mail, mailsh.client, mailsh.server or
mailsh.cli (docs/architecture.md "Import rules").
"""
