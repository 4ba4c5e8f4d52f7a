"""The one settings class of mailsh.

Precedence, highest first: command-line flag > ``MAILSH_*`` environment variable >
``mailsh.toml`` in the home directory > built-in default. The CLI passes only the flags the
user actually gave as keyword arguments, so "flag > env" holds even though typer also
shows the environment variable in ``--help``.

State lives under one home directory (``--home`` / ``MAILSH_HOME``; default from
platformdirs), created mode 0700, with the GnuPG home ``gnupg/`` (0700) inside it
(:mod:`mailsh.home` creates and checks it).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from mailsh.errors import ConfigError, first_validation_error
from mailsh.units import parse_duration, parse_size

CONFIG_FILE_NAME = "mailsh.toml"
MiB = 1024 * 1024
DEFAULT_RUN_AS_MAX_PROCESSES = 256
"""RLIMIT_NPROC of commands when ``run_as`` is set and ``max_processes`` is not."""


def default_home() -> Path:
    """The default home: ``$XDG_DATA_HOME/mailsh`` (``~/.local/share/mailsh``)."""
    from platformdirs import user_data_path

    return user_data_path("mailsh", appauthor=False)


class _HomeTomlSource(PydanticBaseSettingsSource):
    """Reads ``mailsh.toml`` from the home that the higher-priority sources select."""

    def __init__(self, settings_cls: type[BaseSettings], toml_path: Path) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if toml_path.is_file():
            try:
                with toml_path.open("rb") as fh:
                    self._data = tomllib.load(fh)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(
                    f"cannot read {toml_path}: {exc}",
                    hint=f"fix or remove {toml_path}",
                ) from exc
            self._data = {k.replace("-", "_"): v for k, v in self._data.items()}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class Settings(BaseSettings):
    """Every knob of mailsh, client and server.

    Precedence: flag > environment (``MAILSH_<NAME>``) > ``HOME/mailsh.toml`` > default.
    Secrets are ``SecretStr`` and never appear in repr or logs.
    """

    model_config = SettingsConfigDict(
        env_prefix="MAILSH_", extra="forbid", validate_default=True, frozen=True
    )

    # -- identity and GnuPG -------------------------------------------------------------
    home: Path = Field(default_factory=default_home, description="state directory")
    gpg_binary: str = Field(default="gpg", description="GnuPG executable")
    passphrase_file: Path | None = Field(
        default=None, description="file holding the passphrase of this home's key"
    )
    max_gpg_output: int = Field(default=64 * MiB, gt=0, description="gpg --max-output cap")

    # -- mail out (client requests and server replies) ------------------------------------
    smtp: str | None = Field(default=None, description="smtp://[user@]host[:port] or smtps://")
    sendmail: Path | None = Field(default=None, description="local MTA sendmail program")
    smtp_password: SecretStr | None = None
    smtp_ca_file: Path | None = None
    require_tls: bool = False
    smtp_timeout: float = Field(
        default=30.0, gt=0, description="seconds per SMTP network operation when sending"
    )
    sendmail_timeout: float = Field(
        default=60.0, gt=0, description="seconds the sendmail program may take per mail"
    )
    from_address: str | None = Field(default=None, description="envelope/header From address")

    # -- mail in (client replies) ---------------------------------------------------------
    imap_password: SecretStr | None = None
    imap_ca_file: Path | None = None
    imap_timeout: float = Field(
        default=30.0, gt=0, description="seconds an IMAP connect or command may take"
    )
    imap_poll_interval: float = Field(
        default=5.0, gt=0, description="seconds between NOOP polls on servers without IDLE"
    )
    imap_max_reconnects: int = Field(
        default=5, ge=0, description="IMAP reconnects in a row before wait-reply gives up"
    )
    reply_mbox: Path | None = Field(default=None, description="mbox the replies arrive in")
    reply_maildir: Path | None = Field(default=None, description="Maildir the replies arrive in")
    reply_imap: str | None = Field(
        default=None, description="imap(s)://user@host[:port][/MAILBOX] the replies arrive in"
    )
    max_reply_bytes: int = Field(
        default=10 * MiB,
        gt=0,
        description="largest mail read as a reply; larger mail is ignored (over IMAP not fetched)",
    )
    wait_timeout: float = Field(
        default=600.0, gt=0, description="seconds wait-reply waits for a reply"
    )
    request_lifetime: int = Field(
        default=3600, gt=0, le=7 * 86_400, description="seconds a sent request stays valid"
    )

    # -- server ---------------------------------------------------------------------------
    address: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="addresses this server answers to"
    )
    max_message_bytes: int = Field(default=10 * MiB, gt=0)
    clock_skew: int = Field(default=300, ge=0, description="seconds of clock skew tolerated")
    reply_clock_skew: int = Field(
        default=600, ge=0, description="client: seconds of clock skew tolerated in a reply"
    )
    max_request_age: int = Field(default=86_400, gt=0, description="oldest request accepted, s")
    command_timeout: float = Field(default=60.0, gt=0)
    max_command_timeout: float = Field(default=3600.0, gt=0)
    kill_grace: float = Field(
        default=2.0,
        ge=0,
        description="seconds between SIGTERM and SIGKILL when a command is stopped",
    )
    shutdown_grace: float = Field(
        default=30.0,
        ge=0,
        description="seconds running commands may finish after serve is told to stop",
    )
    max_output_bytes: int = Field(default=1 * MiB, gt=0, description="per stream")
    workers: int = Field(default=1, ge=1, le=64)
    claim_sweep_interval: float = Field(
        default=30.0, gt=0, description="seconds between looks for claims of dead serve processes"
    )
    poll_interval: float = Field(
        default=2.0, gt=0, description="seconds between mailbox checks when inotify is absent"
    )
    run_as: str | None = None
    max_processes: int | None = Field(
        default=None,
        ge=0,
        description="RLIMIT_NPROC for commands (per user; 0 = none) "
        f"[{DEFAULT_RUN_AS_MAX_PROCESSES} with run_as, else none]",
    )
    workdir: Path | None = None
    require_encryption: bool = False
    log_format: Literal["text", "json"] = "text"
    # -- server: bounded disk and private replies (docs/server.md "Disk") ----------------
    retention: int = Field(
        default=7 * 86_400, ge=0, description="seconds processed mail stays in spool/done/"
    )
    discard_retention: int = Field(
        default=3600, ge=0, description="seconds discarded (unauthenticated) mail bytes stay"
    )
    min_free_space: int = Field(
        default=100 * MiB, ge=0, description="bytes free below which intake pauses"
    )
    reply_summary: bool = Field(
        default=False, description="status and exit code readable in the reply's clear text"
    )
    reply_lease: float = Field(
        default=300.0,
        gt=0,
        description="seconds a serve process holds the replies it is sending before another "
        "serve sharing the home may send them",
    )
    reply_check_interval: float = Field(
        default=30.0, gt=0, description="longest wait between two looks at the reply queue"
    )
    reply_permanent_attempts: int = Field(
        default=5, ge=1, description="sends of a reply failing permanently before it is given up"
    )

    # -- embedded SMTP listener limits (serve --smtp-listen; docs/server.md) ----------------
    smtp_max_sessions: int = Field(
        default=100, ge=1, description="concurrent SMTP sessions in total"
    )
    smtp_max_sessions_per_peer: int = Field(
        default=10, ge=1, description="concurrent SMTP sessions per peer address (IPv6: /64)"
    )
    smtp_idle_timeout: float = Field(
        default=60.0, gt=0, description="seconds an SMTP client may send nothing"
    )
    smtp_command_timeout: float = Field(
        default=300.0, gt=0, description="seconds from one SMTP command to the next (DATA too)"
    )
    smtp_max_messages: int = Field(
        default=50, ge=1, description="mail transactions (MAIL FROM) per SMTP session"
    )

    @field_validator("address", mode="before")
    @classmethod
    def _split_addresses(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _per_peer_within_total(self) -> Self:
        if self.smtp_max_sessions_per_peer > self.smtp_max_sessions:
            raise ValueError(
                f"smtp_max_sessions_per_peer ({self.smtp_max_sessions_per_peer}) must not "
                f"exceed smtp_max_sessions ({self.smtp_max_sessions})"
            )
        return self

    @property
    def command_max_processes(self) -> int | None:
        """The RLIMIT_NPROC commands get: ``max_processes``, with 0 meaning none, and by
        default :data:`DEFAULT_RUN_AS_MAX_PROCESSES` for a ``run_as`` user, else none (a
        limit would count the serve user's own processes and threads too)."""
        if self.max_processes is None:
            return DEFAULT_RUN_AS_MAX_PROCESSES if self.run_as else None
        return self.max_processes or None

    @field_validator("retention", "discard_retention", mode="before")
    @classmethod
    def _parse_duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("min_free_space", mode="before")
    @classmethod
    def _parse_size(cls, value: object) -> object:
        return parse_size(value) if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        home: Any = None
        if isinstance(init_settings, InitSettingsSource):
            home = init_settings.init_kwargs.get("home")
        home = home or os.environ.get("MAILSH_HOME") or default_home()
        toml = _HomeTomlSource(settings_cls, Path(home).expanduser() / CONFIG_FILE_NAME)
        return (init_settings, env_settings, toml)

    # -- derived paths --------------------------------------------------------------------
    @property
    def gnupg_home(self) -> Path:
        return self.home / "gnupg"

    @property
    def trust_file(self) -> Path:
        return self.home / "trust.json"

    @property
    def state_db(self) -> Path:
        return self.home / "state.db"

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    def passphrase(self) -> str | None:
        """The key passphrase from ``passphrase_file`` (read on use, never stored)."""
        if self.passphrase_file is None:
            return None
        try:
            passphrase = self.passphrase_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(
                f"cannot read passphrase file {self.passphrase_file}: {exc.strerror}",
                hint="check --passphrase-file / MAILSH_PASSPHRASE_FILE",
            ) from exc
        # gpg reads a passphrase up to the first newline; in key generation a newline
        # would even start a new parameter line. Refuse instead of cutting it short.
        if "\n" in passphrase or "\r" in passphrase:
            raise ConfigError(
                f"passphrase file {self.passphrase_file} holds more than one line",
                hint="put the passphrase alone on the first line",
            )
        return passphrase


# Settings that are one choice among alternatives: where the replies arrive, and how mail
# leaves. Precedence applies to the choice as a whole: a source that sets any of them
# replaces whatever a lower source chose, whatever its kind (`--mbox` on the command line
# wins over `reply_maildir` in mailsh.toml; MAILSH_SENDMAIL wins over `smtp` there).
OPTION_FAMILIES: dict[str, tuple[str, ...]] = {
    "reply mailboxes": ("reply_mbox", "reply_maildir", "reply_imap"),
    "ways to send mail": ("smtp", "sendmail"),
}
FAMILY_FLAGS = {
    "reply_mbox": "--mbox",
    "reply_maildir": "--maildir",
    "reply_imap": "--imap",
    "smtp": "--smtp",
    "sendmail": "--sendmail",
}


def _env_names() -> set[str]:
    return {name.upper() for name in os.environ}


def family_overrides(given: dict[str, Any]) -> dict[str, None]:
    """The family members to clear because a higher source chose another one.

    The flags the user gave (``given``) decide a family if they name any of its members;
    otherwise the ``MAILSH_*`` environment does; otherwise the file or the defaults.
    """
    env = _env_names()
    cleared: dict[str, None] = {}
    for family in OPTION_FAMILIES.values():
        for chosen in (
            [name for name in family if name in given],
            [name for name in family if f"MAILSH_{name.upper()}" in env],
        ):
            if chosen:
                cleared.update({name: None for name in family if name not in chosen})
                break
    return cleared


def _check_families(settings: Settings, given: dict[str, Any]) -> None:
    """Two members of a family set by the same source: say which, and where."""
    for what, family in OPTION_FAMILIES.items():
        chosen = [name for name in family if getattr(settings, name) is not None]
        if len(chosen) < 2:
            continue
        if chosen[0] in given:
            flags = " and ".join(FAMILY_FLAGS[name] for name in chosen)
            raise ConfigError(f"{flags} were both given", hint=f"give only one of {flags}")
        if f"MAILSH_{chosen[0].upper()}" in _env_names():
            names = " and ".join(f"MAILSH_{name.upper()}" for name in chosen)
            raise ConfigError(
                f"{names} are both set; several {what} are configured",
                hint="unset all but one (a command-line flag such as "
                f"{FAMILY_FLAGS[chosen[0]]} also overrides them)",
            )
        names = " and ".join(chosen)
        toml = settings.home / CONFIG_FILE_NAME
        raise ConfigError(
            f"{names} are both set in {toml}; several {what} are configured",
            hint=f"keep one of them in {toml} (a command-line flag such as "
            f"{FAMILY_FLAGS[chosen[0]]} also overrides them)",
        )


def load_settings(**flags: Any) -> Settings:
    """Build settings from the flags the user gave (``None`` means "not given")."""
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        settings = Settings(**family_overrides(given), **given)
    except ValidationError as exc:
        where, what = first_validation_error(exc)
        if not where:  # a rule across settings (a model validator)
            message = what.removeprefix("Value error, ")
            raise ConfigError(
                f"invalid settings: {message}",
                hint=f"check the flags, MAILSH_* variables and {CONFIG_FILE_NAME}",
            ) from exc
        raise ConfigError(
            f"invalid setting {where}: {what}",
            hint=f"check the --{where.replace('_', '-')} flag, MAILSH_{where.upper()} "
            f"or {CONFIG_FILE_NAME}",
        ) from exc
    settings = settings.model_copy(update={"home": settings.home.expanduser().absolute()})
    _check_families(settings, given)
    return settings
