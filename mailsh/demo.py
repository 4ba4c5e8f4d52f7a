"""``mailsh demo``: a complete round trip on this machine, with no mail server and no root.

In a temporary directory it creates a client and a server home, generates both keys,
cross-trusts them, starts ``mailsh serve`` with its embedded SMTP listener on 127.0.0.1
(ephemeral port), and an embedded local delivery (a second listener writing into the
client's Maildir) for the reply. Then it sends the command exactly as ``mailsh send``
does, waits exactly as ``mailsh wait-reply`` does, and cleans up.

With ``keep`` (``mailsh demo --keep DIR``) the homes are made in DIR and left there as a
playground wired for the ordinary commands (:func:`write_playground`): each home gets a
``mailsh.toml``; the client sends straight to the server's embedded SMTP listener on a
fixed local port, and the server hands replies to ``DIR/deliver-to-client``, a
five-line script that stands in for a mail server's sendmail by delivering into the
client's Maildir. Nothing else has to run: no MTA, no root, no second listener.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mailsh.client.sources import open_source
from mailsh.errors import MailshError
from mailsh.home import ensure_home
from mailsh.keys.gpg import Gpg
from mailsh.keys.identity import new_identity
from mailsh.keys.trust import add_trusted_key
from mailsh.protocol import Reply
from mailsh.settings import CONFIG_FILE_NAME, Settings, load_settings

CLIENT_ADDRESS = "operator@client.mailsh.test"
SERVER_ADDRESS = "root@server.mailsh.test"


KEEP_KEY_LIFETIME = "90d"
"""Expiry of the keys of a kept playground (a throwaway demo's keys last a day)."""
WAIT_TIMEOUT = 120.0
"""Seconds the demo waits for its reply (``mailsh demo --wait-timeout``, same default)."""
SERVER_WAIT = 30.0
"""Seconds the demo waits for its embedded server to start, and to stop. Not a setting:
the demo's homes are throwaway and its server is local."""
_MAX_SOCKET_PATH = 100
"""gpg-agent's socket lives in the GnuPG home; a Unix socket path has under 108 bytes."""


@dataclass(frozen=True)
class Playground:
    """A kept demo: two wired homes and the commands that use them."""

    root: Path
    server_home: Path
    client_home: Path
    listen: str  # HOST:PORT of the server's embedded SMTP listener
    start_server: list[str]  # argv after the program name
    try_client: list[list[str]]


@dataclass
class DemoResult:
    reply: Reply
    request_id: str
    steps: list[tuple[str, float]] = field(default_factory=list)
    directory: Path | None = None
    playground: Playground | None = None


@dataclass
class _Side:
    settings: Settings
    gpg: Gpg
    fingerprint: str
    pubkey: Path


def _identity(home: Path, email: str, *, expire: str = "1d", **settings: object) -> _Side:
    s = load_settings(home=home, **settings)
    ensure_home(s)
    gpg = Gpg.for_settings(s)
    pubkey = home / f"{email}.asc"
    ident = new_identity(gpg, email, expire=expire, pubkey=pubkey)
    return _Side(settings=s, gpg=gpg, fingerprint=ident.fingerprint, pubkey=pubkey)


def _kill_agents(sides: list[_Side]) -> None:
    for side in sides:
        side.gpg.kill_agent()


def _start_local_delivery(stack: ExitStack, maildir: Path) -> int:
    """The client's "mail server": SMTP on 127.0.0.1 delivering into a Maildir."""
    from mailsh.server.intake.smtp import SmtpListener
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
        thread.join(SERVER_WAIT)

    stack.callback(stop_server)
    deadline = time.monotonic() + SERVER_WAIT
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


def _free_local_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the playground's server listens there)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


_DELIVER_SCRIPT = """#!/bin/sh
# mailsh demo playground: stands in for a mail server's sendmail. The server runs it as
# `deliver-to-client -i -f FROM -- RCPT` with a reply on stdin, and it delivers the
# reply into the client's Maildir the way an MTA does: into tmp/, then renamed to new/.
set -eu
maildir={maildir}
name="$(date +%s).$$.mailsh-demo"
umask 077
cat > "$maildir/tmp/$name"
mv "$maildir/tmp/$name" "$maildir/new/$name"
"""


def check_keep_dir(root: Path) -> Path:
    """``root`` as a place for a new playground: absolute, empty or absent, short enough."""
    root = root.expanduser().absolute()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise MailshError(
            f"{root} already exists and is not an empty directory",
            hint="give a new directory: mailsh demo --keep /tmp/mailsh-play",
        )
    if len(str(root / "client" / "gnupg" / "S.gpg-agent.browser")) > _MAX_SOCKET_PATH:
        raise MailshError(
            f"{root} is too long a path for gpg-agent's socket in the homes inside it",
            hint="choose a shorter directory, e.g. mailsh demo --keep /tmp/mailsh-play",
        )
    return root


def write_playground(root: Path, server: _Side, client: _Side, maildir: Path) -> Playground:
    """Wire the two kept homes to each other for the ordinary commands (module doc)."""
    listen = f"127.0.0.1:{_free_local_port()}"
    deliver = root / "deliver-to-client"
    deliver.write_text(_DELIVER_SCRIPT.format(maildir=shlex.quote(str(maildir))))
    deliver.chmod(0o755)
    server_home, client_home = server.settings.home, client.settings.home
    (server_home / CONFIG_FILE_NAME).write_text(
        "# mailsh demo playground: the server home. Start it with\n"
        f"#   mailsh --home {server_home} serve --smtp-listen {listen}\n"
        f"address = [{_toml(SERVER_ADDRESS)}]\n"
        f"sendmail = {_toml(str(deliver))}  # replies go into the client's Maildir\n"
        f"workdir = {_toml(str(root))}\n"
    )
    (client_home / CONFIG_FILE_NAME).write_text(
        "# mailsh demo playground: the client home.\n"
        f"smtp = {_toml('smtp://' + listen)}  # the server's embedded SMTP listener\n"
        f"reply_maildir = {_toml(str(maildir))}  # where deliver-to-client puts replies\n"
    )
    return Playground(
        root=root,
        server_home=server_home,
        client_home=client_home,
        listen=listen,
        start_server=["--home", str(server_home), "serve", "--smtp-listen", listen],
        try_client=[
            ["--home", str(client_home), "send", "--wait", "uname -a", "--to", SERVER_ADDRESS],
            ["--home", str(client_home), "status"],
            ["--home", str(server_home), "status"],
        ],
    )


def run_demo(
    command: str,
    *,
    keep: Path | None = None,
    timeout: float = WAIT_TIMEOUT,
    progress: Callable[[str], None] = lambda _: None,
) -> DemoResult:
    """Run ``command`` through a real mailsh round trip; return the verified reply.

    With ``keep`` the homes are made in that directory (new or empty) and left there,
    wired as a playground (:class:`Playground`)."""
    from mailsh.client.send import prepare_request, submit_request
    from mailsh.client.wait import await_reply
    from mailsh.mail.smtp_url import parse_smtp_url
    from mailsh.mail.transport import Transport

    steps: list[tuple[str, float]] = []

    def step(name: str, started: float) -> None:
        steps.append((name, time.monotonic() - started))

    if keep is None:
        root = Path(tempfile.mkdtemp(prefix="mailsh-demo.", dir="/tmp"))
    else:
        root = check_keep_dir(keep)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    expire = "1d" if keep is None else KEEP_KEY_LIFETIME
    sides: list[_Side] = []
    with ExitStack() as stack:
        if keep is None:
            stack.callback(shutil.rmtree, root, True)
        stack.callback(_kill_agents, sides)
        stack.enter_context(_quiet_server_logs())

        progress("generating the client and the server key (ed25519)")
        t = time.monotonic()
        client = _identity(root / "client", CLIENT_ADDRESS, expire=expire)
        sides.append(client)
        server_side = _identity(
            root / "server", SERVER_ADDRESS, expire=expire, address=SERVER_ADDRESS
        )
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
        sent = submit_request(
            client.settings,
            prepare_request(
                client.settings,
                client.gpg,
                command=command,
                to=SERVER_ADDRESS,
                require_server_key=True,
                outbound=Transport(smtp=parse_smtp_url(f"smtp://127.0.0.1:{server_port}")),
            ),
        )
        step("sign, encrypt, send", t)

        progress("waiting for the signed, encrypted reply")
        t = time.monotonic()
        reply = await_reply(
            client.settings,
            client.gpg,
            sent.pending,
            timeout=timeout,
            source=open_source(client.settings, sent.pending, maildir=maildir),
        )
        step("verify, run, reply, verify", t)
        playground = None
        if keep is not None:
            playground = write_playground(root, server_side, client, maildir)
        return DemoResult(
            reply=reply,
            request_id=sent.request_id,
            steps=steps,
            directory=None if keep is None else root,
            playground=playground,
        )
    raise AssertionError("unreachable")  # pragma: no cover
