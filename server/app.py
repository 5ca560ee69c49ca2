"""The sink server: listeners, the accept loops, the sessions' nursery, and graceful shutdown.

Resource handling: ``SinkServer.serve`` owns everything it starts. One nursery holds the
sessions; inside it a second one holds the accept loops and the stats reporter, so that a
shutdown can stop accepting first and still wait for the sessions. Nothing outlives ``serve``.

Shutdown (``shutdown()``, or SIGINT/SIGTERM from the CLI): stop accepting and close the
listeners; idle sessions get 421 at once; sessions inside a transaction finish it and then get
421; after the grace period the rest are cancelled and sent 421. ``serve`` then returns normally.

Error handling: running out of file descriptors in accept is survived by backing off (as trio's
``serve_listeners`` does), and logged once when it starts and once when it ends; a client over
``--max-connections`` or ``--max-connections-per-ip`` gets 421 4.7.0 and is closed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import random
import socket
import ssl
import sys
from collections.abc import Sequence

import trio

from mailstorm._net.netstream import SocketTransport
from mailstorm._net.readiness import open_readiness_hub
from mailstorm.errors import ConfigError
from mailstorm.metrics_http import MetricsAddress, bind_metrics_socket, serve_metrics
from mailstorm.wire import reply_table as R
from mailstorm.wire.faults import FaultPlan, FaultSpecError
from mailstorm.wire.server import SessionPolicy

from .admission import AcceptErrorEpisode, AddressSlots
from .authlimit import AuthFailureLimiter
from .config import Address, SinkConfig
from .credentials import CredentialStore
from .proxy import proxy_policy
from .session import IdleReaper, Session, SinkContext
from .stats import SinkStats
from .stores import Store, open_store
from .tls import server_ssl_context

__all__ = ["ConfigError", "SinkServer", "listening_sockets"]

log = logging.getLogger("mailstorm.sink")

#: accept() errors that mean "out of a resource, try again soon" rather than a broken listener.
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
#: How long the accept loop backs off when out of file descriptors.
ACCEPT_BACKOFF = 0.1
#: Connections taken from the backlog per wake-up: many at once under a connect storm, but
#: bounded so that one listener cannot starve the sessions.
ACCEPT_BATCH = 128
#: listen() backlog; the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 65535
#: accept() errors that concern only the connection being accepted.
ACCEPT_TRANSIENT_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}
#: How long a refused (over-capacity) client gets to read its 421.
REFUSAL_TIMEOUT = 2.0


class SinkServer:
    """An SMTP sink. Build it with ``from_config``; run it with ``serve``."""

    def __init__(
        self,
        config: SinkConfig,
        *,
        store: Store,
        credentials: CredentialStore | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.stats = SinkStats()
        self.store = store
        try:
            #: The faults every session consults; its ``every=N`` counts are per process.
            self.fault_plan = FaultPlan.from_specs(
                faults=config.faults,
                delays=config.delays,
                drops=config.drops,
                magic_addresses=config.magic_addresses,
                random=random.Random(config.fault_seed).random,
                hostname=config.hostname,
            )
        except FaultSpecError as exc:
            raise ConfigError(str(exc)) from None
        self.policy = SessionPolicy(
            hostname=config.hostname,
            max_size=config.max_size,
            max_recipients=config.max_recipients,
            max_errors=config.max_errors,
            max_junk_commands=config.max_junk_commands,
            auth_enabled=bool(credentials),
            auth_required=config.auth_required,
            tls_available=ssl_context is not None,
            insecure_auth=config.insecure_auth,
            bare_linefeed=config.bare_linefeed,
            faults=self.fault_plan,
            reply_counts=self.stats.reply_counts,
            lmtp=config.lmtp,
        )
        self._ctx = SinkContext(
            policy=self.policy,
            store=store,
            stats=self.stats,
            credentials=credentials,
            ssl_context=ssl_context,
            command_timeout=config.command_timeout,
            data_timeout=config.data_timeout,
            min_data_rate=config.min_data_rate,
            max_session_time=config.max_session_time,
            auth_limiter=AuthFailureLimiter(config.max_auth_failures),
            throttle=config.throttle,
            proxy=proxy_policy(config.proxy_protocol, config.proxy_from, config.proxy_timeout),
            log_events=config.log_events,
        )
        if config.tls_listen and ssl_context is None:
            raise ConfigError("--tls-listen needs --tls-cert and --tls-key")
        if config.auth_required and not credentials:
            raise ConfigError("--auth-required needs --auth-file with at least one user")
        self.addresses: list[tuple[str, int]] = []
        self.tls_addresses: list[tuple[str, int]] = []
        self._sessions: set[Session] = set()
        self._service_scope: trio.CancelScope | None = None
        self._stopping = False
        self._skip_grace = False
        self._grace_scope: trio.CancelScope | None = None
        self._all_closed = trio.Event()
        #: Open sessions per client address, for --max-connections-per-ip.
        self._address_slots = AddressSlots(config.max_connections_per_ip)
        self._accept_errors = AcceptErrorEpisode(log, trio.current_time, ACCEPT_BACKOFF)
        #: Failed AUTH attempts per client address, shared by every session of this server.
        self.auth_limiter = self._ctx.auth_limiter
        #: Where ``/metrics`` is served once ``serve`` has started (``--metrics-listen``).
        self.metrics_address: MetricsAddress | None = None
        self._metrics_socket: socket.socket | None = None

    @classmethod
    def from_config(cls, config: SinkConfig) -> SinkServer:
        """Open the store, credentials and TLS context named by ``config``.

        Raises ``ConfigError`` with a one-line message for anything unusable.
        """
        try:
            store = open_store(config.store)
            credentials = CredentialStore.load(config.auth_file) if config.auth_file else None
            ssl_context = None
            if config.tls_cert or config.tls_key:
                if not config.tls_cert:
                    raise ConfigError("--tls-key needs --tls-cert")
                ssl_context = server_ssl_context(config.tls_cert, config.tls_key)
        except ConfigError:
            raise
        except ValueError as exc:  # CredentialFileError, TLSConfigError, bad store spec
            raise ConfigError(str(exc)) from None
        return cls(config, store=store, credentials=credentials, ssl_context=ssl_context)

    def credentials_on_plaintext(self) -> bool:
        """True when AUTH works without TLS: the operator should be warned at start-up."""
        return self.policy.auth_enabled and not self.policy.tls_available

    # ---- running ---------------------------------------------------------------------------

    async def serve(
        self,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen, serve until ``shutdown()``, then drain. Reports the bound addresses.

        ``task_status.started`` is called once every listener is bound, so that
        ``await nursery.start(server.serve)`` returns only when clients can connect.
        """
        plain = await self._open_listeners(self.config.listen)
        tls = await self._open_listeners(self.config.tls_listen)
        listeners = [(listener, False) for listener in plain] + [(lst, True) for lst in tls]
        self.addresses = [_bound(lst) for lst in plain]
        self.tls_addresses = [_bound(lst) for lst in tls]
        try:
            if self.config.metrics_listen is not None:
                self._metrics_socket = bind_metrics_socket(self.config.metrics_listen)
            # The readiness hub serves every session's socket, so it outlives the sessions.
            async with open_readiness_hub() as self._ctx.hub:
                await self._serve_sessions(listeners, task_status)
            if self.config.report_interval > 0:
                # The final counts: the supervisor's totals are exact after a graceful stop.
                self._report_counters()
        finally:
            for listener, _ in listeners:
                listener.close()
            if self._metrics_socket is not None:
                self._metrics_socket.close()
        # A worker (--workers) leaves the last word to its supervisor, which sums them all.
        log.log(
            logging.DEBUG if self.config.report_interval > 0 else logging.INFO,
            "stopped: %s",
            self.stats.interval_line(),
            extra={"event": "stopped", "counters": self.stats.snapshot()},
        )

    async def _serve_sessions(
        self,
        listeners: list[tuple[socket.socket, bool]],
        task_status: trio.TaskStatus[list[tuple[str, int]]],
    ) -> None:
        """Accept and run sessions until shutdown, then drain them."""
        async with trio.open_nursery() as sessions:
            reaper_scope = trio.CancelScope()
            sessions.start_soon(self._reap_idle_sessions, reaper_scope)
            metrics_scope = trio.CancelScope()  # metrics: until the sessions have drained
            if self._metrics_socket is not None:
                self.metrics_address = await sessions.start(self._serve_metrics, metrics_scope)
            async with trio.open_nursery() as services:
                self._service_scope = services.cancel_scope
                if self._stopping:
                    services.cancel_scope.cancel()
                for listener, implicit_tls in listeners:
                    services.start_soon(self._accept_loop, listener, implicit_tls, sessions)
                if self.config.stats_interval > 0:
                    services.start_soon(self._report_stats, self.config.stats_interval)
                if self.config.report_interval > 0:
                    services.start_soon(self._report_to_supervisor, self.config.report_interval)
                task_status.started(self.addresses + self.tls_addresses)
            self._accept_errors.close()
            for listener, _ in listeners:
                listener.close()
            await self._drain()
            reaper_scope.cancel()
            metrics_scope.cancel()

    def shutdown(self, *, immediately: bool = False) -> None:
        """Begin a graceful shutdown (idempotent; safe before ``serve`` has started).

        With ``immediately`` the grace period is skipped: every session gets its 421 now.
        """
        self._stopping = True
        if immediately:
            self._skip_grace = True
            if self._grace_scope is not None:
                self._grace_scope.cancel()
        if self._service_scope is not None:
            self._service_scope.cancel()

    async def _open_listeners(self, addresses: Sequence[Address]) -> list[socket.socket]:
        listeners: list[socket.socket] = []
        try:
            for address in addresses:
                listeners += await trio.to_thread.run_sync(
                    listening_sockets, address, self.config.reuse_port
                )
        except BaseException:
            for sock in listeners:
                sock.close()
            raise
        return listeners

    async def _accept_loop(
        self, listener: socket.socket, implicit_tls: bool, sessions: trio.Nursery
    ) -> None:
        """Accept connections in batches: one wake-up takes all that are waiting."""
        max_connections = self.config.max_connections or math.inf
        slots = self._address_slots
        per_address = bool(slots.limit)
        accept_errors = self._accept_errors
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(ACCEPT_BATCH):
                try:
                    sock, peer = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in ACCEPT_TRANSIENT_ERRNOS:
                        continue
                    if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                        accept_errors.failed(exc)
                        await trio.sleep(ACCEPT_BACKOFF)
                        break
                    raise
                if accept_errors.failures:
                    accept_errors.succeeded()
                if len(self._sessions) >= max_connections:
                    self.stats.sessions_refused += 1
                    sessions.start_soon(self._refuse, SocketTransport(sock))
                    continue
                address: str = peer[0]
                if per_address and not slots.acquire(address):
                    self.stats.sessions_refused += 1
                    self.stats.sessions_refused_per_ip += 1
                    sessions.start_soon(self._refuse, SocketTransport(sock))
                    continue
                session = Session(sock, self._ctx, tls=implicit_tls, peer=(address, peer[1]))
                self._sessions.add(session)
                sessions.start_soon(self._run_session, session, address)

    async def _run_session(self, session: Session, address: str) -> None:
        try:
            await session.run()
        finally:
            self._address_slots.release(address)
            self._sessions.discard(session)
            if self._stopping and not self._sessions:
                self._all_closed.set()

    async def _refuse(self, transport: SocketTransport) -> None:
        with trio.move_on_after(REFUSAL_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError):
                self.stats.reply_counts[421] += 1
                await transport.send_all(R.too_many_connections(self.policy.hostname).to_bytes())
        await transport.aclose()

    async def _drain(self) -> None:
        self._stopping = True
        if not self._sessions:
            return
        log.info(
            "shutting down: %d sessions open, grace period %.1fs",
            len(self._sessions),
            self.config.grace_period,
            extra={"event": "draining", "sessions": len(self._sessions)},
        )
        for session in list(self._sessions):
            session.request_stop()
        with trio.move_on_after(self.config.grace_period) as self._grace_scope:
            if self._skip_grace:
                self._grace_scope.cancel()
            await self._all_closed.wait()
        for session in list(self._sessions):
            session.force_stop()

    async def _reap_idle_sessions(self, scope: trio.CancelScope) -> None:
        """Time out idle sessions until the server has drained (owned by the sessions' nursery,
        so timeouts still apply during the grace period)."""
        reaper = IdleReaper.for_timeouts(
            self._sessions, self.config.command_timeout, self.config.data_timeout
        )
        with scope:
            await reaper.run()

    async def _serve_metrics(
        self,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[MetricsAddress] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``/metrics`` from this server's counters until ``scope`` is cancelled."""
        from .metrics import sink_registry  # prometheus-client only when metrics are asked for

        assert self._metrics_socket is not None
        with scope:
            await serve_metrics(
                self._metrics_socket, sink_registry(self.stats.snapshot), task_status=task_status
            )

    async def _report_to_supervisor(self, interval: float) -> None:
        """Worker mode: a JSON line of counters on stdout now and every ``interval`` seconds
        (and a last one when the server has drained, see ``serve``).

        The supervisor reads them from a pipe; when that pipe breaks, the supervisor is gone
        and the worker shuts down gracefully rather than live on as an orphan.
        """
        while self._report_counters():
            await trio.sleep(interval)
        log.error("the supervisor is gone: shutting down")
        self.shutdown()

    def _report_counters(self) -> bool:
        """Write one JSON line of counters to stdout; False if nobody reads it any more."""
        line = json.dumps({"pid": os.getpid(), **self.stats.snapshot()}) + "\n"
        try:
            sys.stdout.write(line)
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            return False
        return True

    async def _report_stats(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            log.info(
                "%s",
                self.stats.interval_line(),
                extra={"event": "stats", "counters": self.stats.snapshot()},
            )


def _bound(listener: socket.socket) -> tuple[str, int]:
    name = listener.getsockname()
    return str(name[0]), int(name[1])


def listening_sockets(address: Address, reuse_port: bool = False) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address ``address.host`` resolves to.

    With ``reuse_port`` several processes bind the same port and the kernel spreads new
    connections over them (SO_REUSEPORT), which is how ``--workers`` shares a listener.

    Raises ``ConfigError`` with one line (for example "address already in use").
    """
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, type_, proto, _, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # One socket per family, as trio.open_tcp_listeners does.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(f"cannot listen on {address}: {reason or exc}") from None
    return sockets
