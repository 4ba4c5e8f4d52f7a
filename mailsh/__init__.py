"""mailsh: remote shell by email.

The CLI (:mod:`mailsh.cli`) is a thin client of this library: the protocol lives in
:mod:`mailsh.protocol`, GnuPG in :mod:`mailsh.keys`, the operator's side in
:mod:`mailsh.client` and the mail-reachable daemon in :mod:`mailsh.server`.
"""

__version__ = "0.1.0"
