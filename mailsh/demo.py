"""``mailsh demo``: a complete round trip on this machine, with no mail server and no root.

In a temporary directory it creates a client and a server home, generates both keys,
cross-trusts them, starts ``mailsh serve`` with its embedded SMTP listener on 127.0.0.1
(ephemeral port), and an embedded local delivery (a second listener writing into the
client's Maildir) for the reply. Then it sends the command exactly as ``mailsh send``
does, waits exactly as ``mailsh wait-reply`` does, and cleans up.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mailsh.errors import MailshError
from mailsh.keys.gpg import Gpg
from mailsh.keys.identity import export_public, generate
from mailsh.keys.trust import add_trusted_key
from mailsh.protocol import Reply
from mailsh.settings import Settings, ensure_home, load_settings

CLIENT_ADDRESS = "operator@client.mailsh.test"
SERVER_ADDRESS = "root@server.mailsh.test"


@dataclass
class DemoResult:
    reply: Reply
    request_id: str
    steps: list[tuple[str, float]] = field(default_factory=list)
    directory: Path | None = None


@dataclass
class _Side:
    settings: Settings
    gpg: Gpg
    fingerprint: str
    pubkey: Path


def _identity(home: Path, email: str, **settings: object) -> _Side:
    s = load_settings(home=home, **settings)
    ensure_home(s)
    gpg = Gpg(s.gnupg_home, binary=s.gpg_binary, max_output=s.max_gpg_output)
    ident = generate(
        gpg,
        email=email,
        name=email.split("@", maxsplit=1)[0],
        algo="ed25519",
        expire="1d",
        passphrase=None,
        force=False,
    )
    pubkey = home / f"{email}.asc"
    pubkey.write_text(export_public(gpg, ident.fingerprint), encoding="utf-8")
    return _Side(settings=s, gpg=gpg, fingerprint=ident.fingerprint, pubkey=pubkey)


def _kill_agents(sides: list[_Side]) -> None:
    for side in sides:
        side.gpg.kill_agent()


def _start_local_delivery(stack: ExitStack, maildir: Path) -> int:
    """The client's "mail server": SMTP on 127.0.0.1 delivering into a Maildir."""
    from mailsh.server.smtp_listener import SmtpListener
    from mailsh.server.spool import Spool

    (maildir / "cur").mkdir(parents=True)
    inbox = SmtpListener(
        host="127.0.0.1",
        port=0,
        spool=Spool(maildir),  # tmp/ -> new/ with fsync: a Maildir delivery
        accept=lambda rcpt: rcpt.lower() == CLIENT_ADDRESS,
        hostname="client.mailsh.test",
    )
    inbox.start()
    stack.callback(inbox.stop)
    return inbox.port


def _start_server(stack: ExitStack, side: _Side, reply_port: int, workdir: Path) -> int:
    """mailsh serve in a thread with its embedded SMTP listener; returns its port."""
    from mailsh.server.daemon import ServeOptions, Server

    settings = load_settings(
        home=side.settings.home,
        address=SERVER_ADDRESS,
        smtp=f"smtp://127.0.0.1:{reply_port}",
        workdir=workdir,
    )
    server = Server(settings, ServeOptions(smtp_listen=("127.0.0.1", 0)))
    thread = threading.Thread(target=server.run, name="mailsh-demo-serve", daemon=True)
    thread.start()

    def stop_server() -> None:
        server.request_stop()
        thread.join(30)

    stack.callback(stop_server)
    deadline = time.monotonic() + 30
    while server.smtp_port is None:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise MailshError("the demo server did not start", hint="run with --debug")
        time.sleep(0.01)
    return server.smtp_port


@contextmanager
def _quiet_server_logs() -> Iterator[None]:
    logger = logging.getLogger("mailsh")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_demo(
    command: str,
    *,
    keep: bool = False,
    timeout: float = 120.0,
    progress: Callable[[str], None] = lambda _: None,
) -> DemoResult:
    """Run ``command`` through a real mailsh round trip; return the verified reply."""
    from mailsh.client.send import send_request
    from mailsh.client.wait import await_reply
    from mailsh.mailer import Outbound
    from mailsh.transport import parse_smtp_url

    steps: list[tuple[str, float]] = []

    def step(name: str, started: float) -> None:
        steps.append((name, time.monotonic() - started))

    root = Path(tempfile.mkdtemp(prefix="mailsh-demo.", dir="/tmp"))
    sides: list[_Side] = []
    with ExitStack() as stack:
        if not keep:
            stack.callback(shutil.rmtree, root, True)
        stack.callback(_kill_agents, sides)
        stack.enter_context(_quiet_server_logs())

        progress("generating the client and the server key (ed25519)")
        t = time.monotonic()
        client = _identity(root / "client", CLIENT_ADDRESS)
        sides.append(client)
        server_side = _identity(root / "server", SERVER_ADDRESS, address=SERVER_ADDRESS)
        sides.append(server_side)
        step("generate two keys", t)

        progress("cross-trusting: the server pins the client key, the client the server's")
        t = time.monotonic()
        add_trusted_key(
            server_side.gpg, server_side.settings.trust_file, client.pubkey, reply_to=None
        )
        add_trusted_key(client.gpg, client.settings.trust_file, server_side.pubkey, reply_to=None)
        step("cross-trust", t)

        progress("starting mailsh serve (SMTP on 127.0.0.1) and the client's local delivery")
        t = time.monotonic()
        maildir = root / "client" / "Maildir"
        reply_port = _start_local_delivery(stack, maildir)
        server_port = _start_server(stack, server_side, reply_port, root)
        step("start server", t)

        progress(f"sending {command!r} to {SERVER_ADDRESS} (signed and encrypted)")
        t = time.monotonic()
        sent = send_request(
            client.settings,
            client.gpg,
            command=command,
            to=SERVER_ADDRESS,
            require_server_key=True,
            outbound=Outbound(smtp=parse_smtp_url(f"smtp://127.0.0.1:{server_port}")),
        )
        step("sign, encrypt, send", t)

        progress("waiting for the signed, encrypted reply")
        t = time.monotonic()
        reply = await_reply(
            client.settings, client.gpg, sent.pending, maildir=maildir, timeout=timeout
        )
        step("verify, run, reply, verify", t)
        return DemoResult(
            reply=reply,
            request_id=sent.request_id,
            steps=steps,
            directory=root if keep else None,
        )
    raise AssertionError("unreachable")  # pragma: no cover
