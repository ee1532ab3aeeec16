"""Building a Config: the layers of a profile, merged, checked, frozen.

A profile is assembled from layers, the later winning:

    field defaults
    [defaults] keys           \\  the values read from a qmail control directory
    qmail control values       >  sit just below the table that names
    [profile.NAME] keys       /   qmail_control (profile's own, else [defaults])

A key set in a profile it does not apply to (see `tlsfront.config.schema`)
is an error; from [defaults] it is left out of the profiles that do not
accept it. Then the rules across keys (`tlsfront.config.crosskey`) run on
the finished Profile. Every value keeps where it came from, so that an
error names the file, the line, the table and the key.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from tlsfront.config.checks import CHECKS
from tlsfront.config.convert import PROFILE_CONV, SETTINGS_CONV, Conv, Ctx, describe
from tlsfront.config.crosskey import RULES
from tlsfront.config.errors import Bad, ConfigError
from tlsfront.config.fromqmail import control_hostname, control_values
from tlsfront.config.machine import default_hostname, default_state_dir
from tlsfront.config.schema import Config, Mode, Profile, Settings, applies_to, refusal
from tlsfront.config.tomllines import KeyLines
from tlsfront.net.address import split_host_port
from tlsfront.qmail.control import QmailControl, QmailControlError, read_control


class _Where(NamedTuple):
    table: tuple[str, ...] | None  # None: from a qmail control file
    key: str  # the key as written (or the control file's name)
    file: Path | None = None  # the control file


class _Val(NamedTuple):
    value: Any
    where: _Where


def _table_name(table: tuple[str, ...]) -> str:
    return ".".join(table)


_PROFILE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Builder:
    """Checks the dicts of one configuration and builds its frozen Config."""

    def __init__(
        self,
        data: Mapping[str, Any],
        path: Path | None,
        lines: KeyLines | None,
        environ: Mapping[str, str] | None,
    ) -> None:
        self.data = data
        self.path = path
        self.lines = lines
        self.environ = os.environ if environ is None else environ
        base = path.absolute().parent if path is not None else Path.cwd()
        self.ctx = Ctx(base, self.environ)
        self._controls: dict[Path, QmailControl] = {}

    # errors

    def error(
        self,
        table: tuple[str, ...] | None,
        key: str | None,
        message: str,
        sub: tuple[str, ...] = (),
    ) -> ConfigError:
        line = None
        if self.lines is not None and table is not None:
            line = self.lines.find(table + ((key,) if key else ()) + sub)
        return ConfigError(
            message,
            path=self.path,
            line=line,
            table=_table_name(table) if table else None,
            key=key,
        )

    def profile_error(
        self, table: tuple[str, ...], field_name: str, merged: Mapping[str, _Val], message: str
    ) -> ConfigError:
        """An error about a profile, at the key's line when the profile set it."""
        val = merged.get(field_name)
        if val is None:
            return self.error(table, field_name, message)
        where = val.where
        if where.table == table:
            return self.error(table, where.key, message)
        if where.table is not None:
            line = self.lines.find((*where.table, where.key)) if self.lines else None
            at = f", line {line}" if line else ""
            message += f" (set in [{_table_name(where.table)}]{at})"
        else:
            message += f" (from qmail control file {where.file})"
        return self.error(table, field_name, message)

    def unknown(self, table: tuple[str, ...], key: str, known: set[str]) -> ConfigError:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return self.error(table, key, f"unknown key{hint}")

    # conversion

    def convert(
        self, table: tuple[str, ...], key: str, value: Any, convs: Mapping[str, Conv]
    ) -> tuple[str, _Val]:
        name = key
        if key == "relay_fingerprints" and isinstance(value, str):
            name = "relay_fingerprints_file"  # a Postfix relay_clientcerts file
        try:
            result = convs[name](value, self.ctx)
            check = CHECKS.get(name)
            if check is not None:
                result = check(result)
        except Bad as exc:
            raise self.error(table, key, exc.message, exc.sub) from None
        return name, _Val(result, _Where(table, key))

    def table(
        self, table: tuple[str, ...], raw: Any, convs: Mapping[str, Conv], known: set[str]
    ) -> dict[str, _Val]:
        if not isinstance(raw, dict):
            raise self.error(table[:-1], table[-1], f"must be a table, not {describe(raw)}")
        out: dict[str, _Val] = {}
        for key, value in raw.items():
            if key not in convs:
                if key in SETTINGS_CONV:
                    raise self.error(table, key, "applies to [defaults] only (a global setting)")
                raise self.unknown(table, key, known)
            name, val = self.convert(table, key, value, convs)
            if name in out:
                raise self.error(table, key, f"is given twice (also as '{out[name].where.key}')")
            out[name] = val
        return out

    def control(self, val: _Val) -> QmailControl:
        directory: Path = val.value
        if directory not in self._controls:
            try:
                self._controls[directory] = read_control(directory, self.environ)
            except QmailControlError as exc:
                assert val.where.table is not None
                raise self.error(val.where.table, val.where.key, str(exc)) from None
        return self._controls[directory]

    def control_values(self, qc: QmailControl, mode: Mode) -> dict[str, _Val]:
        return {
            name: _Val(value, _Where(None, file.name, file))
            for name, (value, file) in control_values(qc, mode, self.environ).items()
        }

    # the whole

    def build(self) -> Config:
        for top, value in self.data.items():
            if top in ("defaults", "profile"):
                continue
            if isinstance(value, dict):
                message = "unknown table: the file holds [defaults] and [profile.NAME] tables"
                raise self.error((top,), None, message)
            raise self.error((), top, "unknown key outside any table: settings go in [defaults]")
        known = set(SETTINGS_CONV) | set(PROFILE_CONV)
        both = {**PROFILE_CONV, **SETTINGS_CONV}
        defaults = self.table(("defaults",), self.data.get("defaults", {}), both, known)
        d_settings = {k: v for k, v in defaults.items() if k in SETTINGS_CONV}
        d_profile = {k: v for k, v in defaults.items() if k in PROFILE_CONV}
        d_qc = self.control(d_profile["qmail_control"]) if "qmail_control" in d_profile else None

        settings_values = {k: v.value for k, v in d_settings.items()}
        if "hostname" not in settings_values:
            settings_values["hostname"] = (d_qc and control_hostname(d_qc)) or default_hostname()
        settings_values.setdefault("state_dir", default_state_dir(self.environ))
        settings = Settings(**settings_values)

        raw_profiles = self.data.get("profile", {})
        if not isinstance(raw_profiles, dict):
            raise self.error(("profile",), None, "must be [profile.NAME] tables")
        if not raw_profiles:
            raise self.error(None, None, "no [profile.NAME] table: nothing to serve")
        profiles: dict[str, Profile] = {}
        listening: dict[tuple[str, int], str] = {}
        sockets: dict[str, str] = {}
        for name, raw in raw_profiles.items():
            table = ("profile", name)
            if not _PROFILE_NAME.fullmatch(name):
                raise self.error(table, None, "a profile name is letters, digits, '_' and '-'")
            profile, merged = self.profile(table, raw, d_profile, d_qc, settings)
            for address in profile.listen:
                host, port = split_host_port(address)
                if host != "*":
                    host = ipaddress.ip_address(host).compressed
                if port != 0 and (host, port) in listening:  # 0: a free port each
                    other = listening[host, port]
                    where = "twice in listen" if other == name else f"also in [profile.{other}]"
                    raise self.profile_error(table, "listen", merged, f"{address!r} is {where}")
                listening[host, port] = name
            if profile.systemd is not None:
                other = sockets.setdefault(profile.systemd, name)
                if other != name:
                    raise self.profile_error(
                        table, "systemd", merged, f"{profile.systemd!r} is also [profile.{other}]'s"
                    )
            profiles[name] = profile
        return Config(self.path, settings, MappingProxyType(profiles))

    def profile(
        self,
        table: tuple[str, ...],
        raw: Any,
        d_profile: dict[str, _Val],
        d_qc: QmailControl | None,
        settings: Settings,
    ) -> tuple[Profile, dict[str, _Val]]:
        known = set(PROFILE_CONV)
        own = self.table(table, raw, PROFILE_CONV, known)
        mode_val = own.get("mode") or d_profile.get("mode")
        mode: Mode = "inbound" if mode_val is None else mode_val.value
        for name, val in own.items():
            if not applies_to(name, mode):
                raise self.error(table, val.where.key, refusal(name))
        # a default applies to the profiles that accept it
        inherited = {k: v for k, v in d_profile.items() if applies_to(k, mode)}
        if "backend" in own or "backend_connect" in own:  # the profile picks its own kind
            inherited.pop("backend", None)
            inherited.pop("backend_connect", None)

        # qmail control values sit just below the table that names the directory
        layers: list[dict[str, _Val]] = [inherited, own]
        qc = None
        if "qmail_control" in own:
            qc = self.control(own["qmail_control"])
            layers.insert(1, self.control_values(qc, mode))
        elif d_qc is not None:
            qc = d_qc
            layers.insert(0, self.control_values(qc, mode))
        merged: dict[str, _Val] = {}
        for layer in layers:
            merged.update(layer)

        if "hostname" not in merged:
            me = control_hostname(qc) if qc is not None else None
            merged["hostname"] = _Val(me or settings.hostname, _Where(None, "me"))
        relay_clients = merged.get("relay_clients")
        # an explicit client_cert = "none" switches the control files' relaying off
        from_control = relay_clients is not None and relay_clients.where.table is None
        if from_control and merged["client_cert"].value == "none":
            del merged["relay_clients"]

        profile = Profile(name=table[-1], **{k: v.value for k, v in merged.items()})
        for key, broken, message in RULES[mode]:
            if broken(profile):
                text = message.format(p=profile, n_key=len(profile.key), n_cert=len(profile.cert))
                raise self.profile_error(table, key, merged, text)
        return profile, merged
