"""The cluster keys: loaded from the state dir or the config, changed on a running agent,
and the sealer and codec every packet and call goes through."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from flexmesh.agent import rpc
from flexmesh.agent.config import Settings
from flexmesh.protocol.crypto import Keyring, KeyringError, Sealer

log = logging.getLogger("flexmesh.agent")

START_SKEW = 1.0  # seconds of peers' clock lag tolerated right after a start
UNKNOWN_KEY_LOG_EVERY = 60.0  # seconds between log lines about packets under unknown keys


def cpu_has_aes(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has AES instructions (x86 ``flags``, ARM ``Features``): where it
    has not, AES-GCM is slower than ChaCha20 and bulk frames stay under the latter."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    return any(line.split(":", 1)[0].strip() in ("flags", "Features")
               and "aes" in line.split(":", 1)[-1].split() for line in text.splitlines())


AES_INSTRUCTIONS = cpu_has_aes()


class KeysError(Exception):
    """The keys cannot be loaded; the message says why, in one line."""


class Keys:
    def __init__(self, settings: Settings, state_dir: Path) -> None:
        self.settings = settings
        self.path = state_dir / "keyring.json"  # kept by ``flexmesh keys``
        self.keyring = Keyring()
        self.sealer: Sealer | None = None
        self.codec = rpc.Codec()
        self._warned_plaintext = False
        self._unknown_logged_at = -UNKNOWN_KEY_LOG_EVERY

    def load(self) -> None:
        """The keyring kept by ``flexmesh keys`` wins; else the configured key(s)."""
        try:
            if self.path.exists():
                ring = Keyring.from_list(json.loads(self.path.read_text()))
                self._compare(ring)
            else:
                ring = self._configured()
        except (OSError, ValueError) as exc:
            raise KeysError(f"cannot load the keyring: {exc}") from None
        if not len(ring):
            self._plaintext()
            if self.sealer is not None:
                log.warning("INSECURE: the cluster key is gone from the configuration: "
                            "gossip and calls run in plaintext from now on")
        self.keyring = ring  # only now: a ring refused above leaves the running one
        self._apply()

    def _compare(self, ring: Keyring) -> None:
        """Say so when the configured keys (if readable) differ from the kept ring."""
        try:
            configured = self._configured()
        except (OSError, ValueError, KeysError):
            return  # not used: the kept ring wins
        if len(configured) and set(configured.keys) != set(ring.keys):
            log.warning("keyring: using %s (kept by `flexmesh keys`); the configured "
                        "key(s) differ and are not used", self.path)

    def _plaintext(self) -> None:
        """No key: refused unless plaintext was asked for by name, and then said loudly."""
        s = self.settings
        if not s.insecure_plaintext:
            raise KeysError(
                "no key is configured: make one with `flexmesh keygen FILE` and set "
                "[security] key_file = FILE (or --key-file FILE); for a throwaway test on "
                "this machine only, --insecure-plaintext runs without one")
        if self.sealer is None and not self._warned_plaintext:
            self._warned_plaintext = True
            where = "loopback" if s.is_loopback() else f"{s.bind}, NOT loopback"
            log.warning("INSECURE: no cluster key ([security] insecure_plaintext): gossip and "
                        "calls on %s run in plaintext; anyone who reaches the port can read "
                        "job output, cancel jobs and forge membership", where)

    def _configured(self) -> Keyring:
        """The keys of ``[security] key_file`` and ``key``; a key file that others may
        read is refused, as ssh refuses a private key."""
        s = self.settings
        keys = []
        if s.key_file:
            path = Path(s.key_file)
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise KeysError(f"key file {path} is readable by group or others (mode "
                                f"{mode:04o}): run `chmod 600 {path}`")
            keys += [line.strip() for line in path.read_text().splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
        if s.key:
            keys.append(s.key)
        return Keyring(keys)

    def unknown_key(self, source: str, detail: str, now: float) -> None:
        """A packet sealed under a key not in the ring: logged at most once a minute, so
        a rotation left half done shows in the log, not only in the counters."""
        if now - self._unknown_logged_at < UNKNOWN_KEY_LOG_EVERY:
            return
        self._unknown_logged_at = now
        log.warning("dropping packets from %s sealed under a key this agent does not have "
                    "(fingerprint %s): is a key rotation half done? `flexmesh keys` on each node "
                    "shows its keys", source, detail or "unknown")

    def reload(self, settings: Settings) -> None:
        """The keys of new settings; on KeysError the running ones stay, unchanged."""
        old = self.settings
        self.settings = settings
        if not self.path.exists():  # keys changed with `flexmesh keys` stay
            try:
                self.load()
            except KeysError:
                self.settings = old
                raise

    def _apply(self) -> None:
        if self.sealer is not None and len(self.keyring):
            self.sealer.keyring = self.keyring  # keep its nonce sequence and replay window
        else:
            self.sealer = Sealer(self.keyring) if len(self.keyring) else None
            if self.sealer is not None:
                # Nothing sealed before this agent started opens here: a capture of an
                # earlier run's traffic cannot be replayed to this one (its replay window
                # starts empty). A peer whose clock lags by more than START_SKEW is
                # refused for that long after a start.
                self.sealer.window.floor_ms = int((time.time() - START_SKEW) * 1000)
        self.codec = rpc.Codec(self.sealer, self.settings.cluster.encode(),
                               me=self.settings.name, aes=AES_INSTRUCTIONS)

    def view(self) -> dict[str, Any]:
        return {"primary": self.keyring.primary, "keys": list(self.keyring.keys),
                "encrypted": self.sealer is not None, "cluster": self.settings.cluster}

    async def change(self, op: str, key: str) -> dict[str, Any]:
        """Add, promote or remove a key on the running agent, and keep the ring on disk."""
        ring = Keyring.from_list(self.keyring.to_list())
        if op == "add":
            ring.add(key)
        elif op == "promote":
            ring.promote(key)
        elif op == "remove":
            ring.remove(key)
        else:
            raise KeyringError(f"unknown key operation {op!r} (add, promote, remove)")
        await asyncio.to_thread(_write_private, self.path, json.dumps(ring.to_list()))
        self.keyring = ring
        if self.sealer is None:
            self._apply()
        else:  # keep the sealer (its nonce sequence and replay window), swap its keys
            self.sealer.keyring = ring
        log.info("keyring %s primary=%s keys=%d", op, self.keyring.primary, len(self.keyring))
        return self.view()


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
