"""The one settings class of mailsh.

Precedence, highest first: command-line flag > ``MAILSH_*`` environment variable >
``mailsh.toml`` in the home directory > built-in default. The CLI passes only the flags the
user actually gave as keyword arguments, so "flag > env" holds even though typer also
shows the environment variable in ``--help``.

State lives under one home directory (``--home`` / ``MAILSH_HOME``; default from
platformdirs), created mode 0700, with the GnuPG home ``gnupg/`` (0700) inside it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from mailsh.errors import ConfigError
from mailsh.units import parse_duration, parse_size

CONFIG_FILE_NAME = "mailsh.toml"
MiB = 1024 * 1024


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
    from_address: str | None = Field(default=None, description="envelope/header From address")

    # -- mail in (client replies) ---------------------------------------------------------
    imap_password: SecretStr | None = None
    imap_ca_file: Path | None = None
    reply_mbox: Path | None = Field(default=None, description="mbox the replies arrive in")
    reply_maildir: Path | None = Field(default=None, description="Maildir the replies arrive in")
    reply_imap: str | None = Field(
        default=None, description="imap(s)://user@host[:port][/MAILBOX] the replies arrive in"
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
    max_request_age: int = Field(default=86_400, gt=0, description="oldest request accepted, s")
    command_timeout: float = Field(default=60.0, gt=0)
    max_command_timeout: float = Field(default=3600.0, gt=0)
    max_output_bytes: int = Field(default=1 * MiB, gt=0, description="per stream")
    workers: int = Field(default=1, ge=1, le=64)
    run_as: str | None = None
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

    @field_validator("address", mode="before")
    @classmethod
    def _split_addresses(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

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
            return self.passphrase_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(
                f"cannot read passphrase file {self.passphrase_file}: {exc.strerror}",
                hint="check --passphrase-file / MAILSH_PASSPHRASE_FILE",
            ) from exc


def load_settings(**flags: Any) -> Settings:
    """Build settings from the flags the user gave (``None`` means "not given")."""
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(
            f"invalid setting {where}: {first['msg']}",
            hint=f"check the --{where.replace('_', '-')} flag, MAILSH_{where.upper()} "
            f"or {CONFIG_FILE_NAME}",
        ) from exc
    return settings.model_copy(update={"home": settings.home.expanduser().absolute()})


def ensure_home(settings: Settings) -> Path:
    """Create the home (0700) and its GnuPG home (0700); fix looser modes we created."""
    for directory in (settings.home, settings.gnupg_home):
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if directory.stat().st_mode & 0o077:
                directory.chmod(0o700)
        except OSError as exc:
            raise ConfigError(
                f"cannot create {directory}: {exc.strerror}",
                hint="choose a writable --home DIR (or set MAILSH_HOME)",
            ) from exc
    return settings.home
