"""Hostile inputs: OpenPGP messages and mails forged with the real gpg CLI."""
