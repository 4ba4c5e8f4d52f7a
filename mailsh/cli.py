"""The ``mailsh`` command: a typer app and nothing else.

Each command parses its options, builds :class:`~mailsh.settings.Settings`, calls the
library, and renders the result. Errors are caught in exactly one place, :func:`main`,
which maps them to :class:`~mailsh.errors.ExitCode`. Heavy modules (pydantic, gnupg,
asyncio) are imported inside commands so ``mailsh --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from mailsh.errors import ExitCode, MailshError

if TYPE_CHECKING:
    from rich.console import Console

    from mailsh.settings import Settings

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 2 usage error; 75 (deliver) temporary failure, the MTA retries; "
    "255 mailsh itself failed; wait-reply and send --wait pass the remote command's status "
    "through (128+N when killed by signal N), like ssh."
)

app = typer.Typer(
    name="mailsh",
    help="Remote shell by email: signed commands in, signed and encrypted results out.\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode=None,
)
keys_app = typer.Typer(help="Show or export this home's own key.", no_args_is_help=True)
trust_app = typer.Typer(
    help="Pin the keys allowed to talk to this home (the only source of authorization).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")
app.add_typer(trust_app, name="trust")


class _Global:
    home: Path | None = None
    debug: bool = False


def _err() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _say(text: str) -> None:
    """A diagnostic line on stderr (never stdout: stdout carries data)."""
    _err().print(text, markup=False)


def _settings(**flags: Any) -> Settings:
    from mailsh.settings import ensure_home, load_settings

    settings = load_settings(home=_Global.home, **flags)
    ensure_home(settings)
    return settings


HomeOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional at runtime on 3.11
    typer.Option(
        "--home",
        envvar="MAILSH_HOME",
        help="State directory of this identity (keys, trust store, state).",
        show_default="~/.local/share/mailsh",
    ),
]


@app.callback()
def _main(
    home: HomeOpt = None,
    debug: Annotated[
        bool, typer.Option("--debug", envvar="MAILSH_DEBUG", help="Show tracebacks.")
    ] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        from mailsh import __version__

        typer.echo(f"mailsh {__version__}")
        raise typer.Exit(0)
    _Global.home = home
    _Global.debug = debug


# -- keys -----------------------------------------------------------------------------


def _gpg(settings: Settings) -> Any:
    from mailsh.keys.gpg import Gpg

    return Gpg(settings.gnupg_home, binary=settings.gpg_binary, max_output=settings.max_gpg_output)


@app.command()
def keygen(
    email: Annotated[str, typer.Option("--email", help="Address this identity uses.")],
    name: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--name", help="Real name in the user id (default: the address)."),
    ] = None,
    algo: Annotated[
        str, typer.Option("--algo", help="ed25519 (default), rsa3072 or rsa4096.")
    ] = "ed25519",
    expire: Annotated[
        str, typer.Option("--expire", help="Key lifetime, gpg syntax (2y, 90d, 0 = never).")
    ] = "2y",
    output: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--output", "-o", help="Where to write the public key [./EMAIL.asc]."),
    ] = None,
    passphrase_file: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--passphrase-file",
            envvar="MAILSH_PASSPHRASE_FILE",
            help="Protect the key with the passphrase in this file (used unattended).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing identity.")] = False,
) -> None:
    """Create this home's key pair and print its fingerprint.

    Default: an ed25519 signing primary key with a cv25519 encryption subkey, valid 2 years.
    The public key goes to ./EMAIL.asc: give it to the other side's `mailsh trust add`.
    """
    from mailsh.addresses import validate_address
    from mailsh.keys import identity as ident

    if algo not in ("ed25519", "rsa3072", "rsa4096"):
        raise _usage(f"unknown --algo {algo!r}", "use ed25519, rsa3072 or rsa4096")
    email = validate_address(email)
    settings = _settings(passphrase_file=passphrase_file)
    passphrase = settings.passphrase()
    gpg = _gpg(settings)
    if passphrase is None:
        _say("note: no --passphrase-file, so the secret key is stored unprotected in the home")
    _say(f"generating an {algo} key for {email} ...")
    identity = ident.generate(
        gpg,
        email=email,
        name=name or email.split("@")[0],
        algo=algo,  # type: ignore[arg-type]
        expire=expire,
        passphrase=passphrase,
        force=force,
    )
    target = output or Path(f"{email}.asc")
    target.write_text(ident.export_public(gpg, identity.fingerprint), encoding="utf-8")
    typer.echo(identity.fingerprint)
    _say(f"public key written to {target}; on the other side run: mailsh trust add {target}")


@keys_app.command("show")
def keys_show(
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show this home's identity (fingerprint, user ids, expiry)."""
    from mailsh.keys.identity import require_identity

    identity = require_identity(_gpg(_settings()))
    if json_out:
        import json

        doc = {"fingerprint": identity.fingerprint, "uids": list(identity.uids)}
        doc["expires"] = identity.expires  # type: ignore[assignment]
        typer.echo(json.dumps(doc))
        return
    typer.echo(identity.fingerprint)
    for uid in identity.uids:
        typer.echo(f"  uid {uid}")
    if identity.expires:
        from datetime import UTC, datetime

        when = datetime.fromtimestamp(identity.expires, UTC).date().isoformat()
        typer.echo(f"  expires {when}")


@keys_app.command("export")
def keys_export(
    output: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--output", "-o", help="File to write (default: stdout)."),
    ] = None,
) -> None:
    """Export this home's public key (armored) for the other side's `mailsh trust add`."""
    from mailsh.keys.identity import export_public, require_identity

    gpg = _gpg(_settings())
    armored = export_public(gpg, require_identity(gpg).fingerprint)
    if output is None:
        typer.echo(armored, nl=False)
    else:
        output.write_text(armored, encoding="utf-8")
        _say(f"public key written to {output}")


# -- trust ----------------------------------------------------------------------------


@trust_app.command("add")
def trust_add(
    key_file: Annotated[Path, typer.Argument(help="An exported public key (armored).")],
    reply_to: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--reply-to", help="Address replies to this key go to [its uid email]."),
    ] = None,
    allow_plain_scripts: Annotated[
        bool,
        typer.Option(
            "--allow-plain-scripts",
            help="Also run the original proof of concept's form (a signed script, no "
            "envelope). Weaker: no audience binding. Off by default.",
        ),
    ] = False,
) -> None:
    """Import exactly one public key and pin its primary fingerprint."""
    from mailsh.keys.trust import add_trusted_key

    settings = _settings()
    entry = add_trusted_key(
        _gpg(settings),
        settings.trust_file,
        key_file,
        reply_to=reply_to,
        allow_plain_scripts=allow_plain_scripts,
    )
    typer.echo(entry.fingerprint)
    for uid in entry.uids:
        _say(f"  uid {uid}")
    _say(f"  replies go to {entry.reply_to}")
    if allow_plain_scripts:
        _say("  plain signed scripts allowed (no audience binding: see docs/protocol.md)")


@trust_app.command("list")
def trust_list(
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the pinned keys."""
    from dataclasses import asdict

    from mailsh.keys.trust import load_trust

    store = load_trust(_settings().trust_file)
    if json_out:
        import json

        typer.echo(json.dumps([asdict(k) for k in store.keys], indent=2))
        return
    if not store.keys:
        _say("no trusted keys yet; add one with: mailsh trust add KEYFILE.asc")
    for key in store.keys:
        flags = " plain-scripts" if key.allow_plain_scripts else ""
        typer.echo(f"{key.fingerprint}  {key.reply_to}{flags}")


@trust_app.command("remove")
def trust_remove(
    fingerprint: Annotated[str, typer.Argument(help="The 40-hex primary fingerprint.")],
) -> None:
    """Unpin a key: it no longer authorizes anything."""
    from mailsh.keys.trust import remove_trusted_key

    entry = remove_trusted_key(_settings().trust_file, fingerprint)
    _say(f"removed {entry.fingerprint} ({entry.reply_to})")


# -- error funnel ---------------------------------------------------------------------


def _usage(message: str, hint: str) -> MailshError:
    from mailsh.errors import UsageError

    return UsageError(message, hint=hint)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, map every expected failure to one exit code.

    typer/click handle usage errors themselves (exit 2) and exit via SystemExit;
    MailshError propagates out of the app and is rendered here, and only here.
    """
    try:
        app(args=argv, prog_name="mailsh")
    except MailshError as exc:
        if _Global.debug:
            import traceback

            traceback.print_exc()
        _say(f"mailsh: {exc.message}")
        if exc.hint:
            _say(f"  next: {exc.hint}")
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        _say("mailsh: interrupted")
        sys.exit(int(ExitCode.FAILURE))
