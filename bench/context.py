"""What the sections share: the scratch directory, the sizes, and the key pairs."""

from __future__ import annotations

import itertools
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.core import Sizes
from bench.world import CLIENT, SERVER, Home, clone_home, kill_agent, make_home, pair
from mailsh.keys.identity import Algo


@dataclass
class Ctx:
    sizes: Sizes
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mailsh-bench.")))
    keep: bool = False
    verbose: bool = True
    _pairs: dict[str, tuple[Home, Home]] = field(default_factory=dict)
    _homes: list[Path] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def say(self, text: str) -> None:
        if self.verbose:
            print(f"  .. {text}", file=sys.stderr, flush=True)

    def scratch(self, name: str) -> Path:
        path = self.root / f"{next(self._seq):03d}-{name}"
        path.mkdir(parents=True)
        return path

    def pair(self, algo: Algo = "ed25519") -> tuple[Home, Home]:
        """A cross-trusted (client, server) pair with fresh keys of ``algo``."""
        if algo not in self._pairs:
            self.say(f"generating a client and a server key ({algo})")
            base = self.scratch(f"keys-{algo}")
            client = make_home(base / "client", CLIENT, algo)
            server = make_home(base / "server", SERVER, algo)
            self._homes += [client.path, server.path]
            pair(client, server)
            self._pairs[algo] = (client, server)
        return self._pairs[algo]

    def server_copy(self, server: Home, name: str) -> Path:
        """A fresh server home with the same key and trust, and no state."""
        path = clone_home(server, self.scratch(name) / "server")
        self._homes.append(path)
        return path

    def client_copy(self, client: Home, name: str) -> Path:
        path = clone_home(client, self.scratch(name) / "client")
        self._homes.append(path)
        return path

    def close(self) -> None:
        for home in self._homes:
            kill_agent(home)
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
