"""``mailsh keygen``, ``mailsh keys ...`` and ``mailsh trust ...``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from mailsh.cli import app, gpg_for, keys_app, say, settings_from, trust_app, usage_error
from mailsh.cli.options import OptPath, OptStr, option, setting

# -- keys -----------------------------------------------------------------------------


@app.command()
def keygen(
    email: Annotated[
        str, typer.Option("--email", metavar="ADDR", help="Address this identity uses.")
    ],
    name: Annotated[
        OptStr,
        option(
            "--name",
            metavar="NAME",
            help="Name in the user id [the part of the address before the @].",
        ),
    ] = None,
    algo: Annotated[
        str, typer.Option("--algo", metavar="ALGO", help="ed25519, rsa3072 or rsa4096.")
    ] = "ed25519",
    expire: Annotated[
        str,
        typer.Option(
            "--expire",
            metavar="WHEN",
            help="Key lifetime: N days, weeks, months or years (90d, 12w, 6m, 2y), an end "
            "date (YYYY-MM-DD), or 0 / never.",
        ),
    ] = "2y",
    output: Annotated[
        OptPath,
        option(
            "--output", "-o", metavar="FILE", help="Where to write the public key [./EMAIL.asc]."
        ),
    ] = None,
    passphrase_file: Annotated[
        OptPath,
        setting(
            "--passphrase-file",
            "FILE",
            "Protect the key with the passphrase in this file (used unattended).",
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
        raise usage_error(f"unknown --algo {algo!r}", "use ed25519, rsa3072 or rsa4096")
    _check_expire(expire)
    target = output or Path(f"{email}.asc")
    if not target.parent.is_dir():
        raise usage_error(
            f"cannot write the public key to {target}: {target.parent} is not a directory",
            "choose another --output FILE",
        )
    if name is not None and (not name.isprintable() or "<" in name or ">" in name):
        raise usage_error(
            f"--name {name!r} cannot be part of a user id",
            "use printable characters without < and > (the address is added in <...>)",
        )
    email = validate_address(email)
    settings = settings_from(passphrase_file=passphrase_file)
    passphrase = settings.passphrase()
    gpg = gpg_for(settings)
    ident.refuse_existing(gpg, force=force)  # before announcing anything
    if passphrase is None:
        say("note: no --passphrase-file, so the secret key is stored unprotected in the home")
    say(f"generating an {algo} key for {email} ...")
    identity = ident.generate(
        gpg,
        email=email,
        name=name or email.split("@")[0],
        algo=algo,  # type: ignore[arg-type]
        expire=expire,
        passphrase=passphrase,
        force=force,
    )
    _write_key(
        target,
        ident.export_public(gpg, identity.fingerprint),
        "the key was made; write it elsewhere with: mailsh keys export -o FILE",
    )
    typer.echo(identity.fingerprint)
    say(f"public key written to {target}; on the other side run: mailsh trust add {target}")


def _write_key(path: Path, armored: str, hint: str) -> None:
    from mailsh.errors import ConfigError

    try:
        path.write_text(armored, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}", hint=hint) from exc


_EXPIRE = re.compile(r"(0|never|none|[1-9][0-9]{0,5}[dwmy]?|(\d{4}-\d{2}-\d{2}))")


def _check_expire(expire: str) -> None:
    """Refuse what gpg would refuse (or read differently) before anything is generated."""
    match = _EXPIRE.fullmatch(expire.strip().lower())
    if match is None:
        raise usage_error(
            f"--expire {expire!r} is not a key lifetime",
            "use e.g. 2y, 6m, 12w or 90d, an end date YYYY-MM-DD, or 0 (never expires)",
        )
    if match.group(2) is not None:
        from datetime import date

        try:
            end = date.fromisoformat(match.group(2))
        except ValueError:
            raise usage_error(f"--expire {expire!r} is not a date", "use YYYY-MM-DD") from None
        if end <= date.today():
            raise usage_error(
                f"--expire {expire} is not in the future", "give a later date, or e.g. 2y"
            )


@keys_app.command("show")
def keys_show(
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show this home's identity (fingerprint, user ids, expiry)."""
    from mailsh.keys.identity import require_identity

    identity = require_identity(gpg_for(settings_from()))
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
        OptPath, option("--output", "-o", metavar="FILE", help="File to write [stdout].")
    ] = None,
) -> None:
    """Export this home's public key (armored) for the other side's `mailsh trust add`."""
    from mailsh.keys.identity import export_public, require_identity

    gpg = gpg_for(settings_from())
    armored = export_public(gpg, require_identity(gpg).fingerprint)
    if output is None:
        typer.echo(armored, nl=False)
    else:
        _write_key(output, armored, "choose another --output FILE")
        say(f"public key written to {output}")


# -- trust ----------------------------------------------------------------------------


@trust_app.command("add")
def trust_add(
    key_file: Annotated[
        Path,
        typer.Argument(
            metavar="KEYFILE",
            help="An exported public key (armored), or - to read it from standard input.",
        ),
    ],
    reply_to: Annotated[
        OptStr,
        option(
            "--reply-to", metavar="ADDR", help="Address replies to this key go to [its uid email]."
        ),
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
    """Import exactly one public key and pin its primary fingerprint.

    The key is the other side's (never this home's own): e.g. `mailsh trust add
    server.asc`, or `ssh server mailsh keys export | mailsh trust add -`.
    """
    from mailsh.keys.trust import add_trusted_key

    settings = settings_from()
    entry = add_trusted_key(
        gpg_for(settings),
        settings.trust_file,
        key_file,
        reply_to=reply_to,
        allow_plain_scripts=allow_plain_scripts,
    )
    typer.echo(entry.fingerprint)
    for uid in entry.uids:
        say(f"  uid {uid}")
    say(f"  replies go to {entry.reply_to}")
    if allow_plain_scripts:
        say("  plain signed scripts allowed (no audience binding: see docs/protocol.md)")


@trust_app.command("list")
def trust_list(
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the pinned keys."""
    from dataclasses import asdict

    from mailsh.keys.trust import load_trust

    store = load_trust(settings_from().trust_file)
    if json_out:
        import json

        typer.echo(json.dumps([asdict(k) for k in store.keys], indent=2))
        return
    if not store.keys:
        say("no trusted keys yet; add one with: mailsh trust add KEYFILE.asc")
    for key in store.keys:
        flags = " plain-scripts" if key.allow_plain_scripts else ""
        typer.echo(f"{key.fingerprint}  {key.reply_to}{flags}")


@trust_app.command("remove")
def trust_remove(
    key: Annotated[
        str,
        typer.Argument(
            metavar="KEY",
            help="The pinned key: its fingerprint, a unique prefix of it (8 or more hex "
            "digits), or its email address.",
        ),
    ],
) -> None:
    """Unpin a key: it no longer authorizes anything."""
    from mailsh.keys.trust import remove_trusted_key

    entry = remove_trusted_key(settings_from().trust_file, key)
    say(f"removed {entry.fingerprint} ({entry.reply_to})")
