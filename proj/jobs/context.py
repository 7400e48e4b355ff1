"""What a job carries from where it was enqueued to where it runs.

At enqueue, :func:`capture` takes the caller's context: the W3C trace
context of the current span (``traceparent``, ``tracestate``), the tenant,
the request id, and any field an application added with :func:`carry`. The
ledger row keeps it (``jobs.context``, ``jobs.tenant``) and the message
carries it in its :data:`HEADER` header, on the fast path and through the
relay alike, however much later and from whichever process the relay
publishes. The worker restores it around the run (:func:`restored`): the
context variables are set, the trace context is attached, and each
transaction of the run's session on PostgreSQL begins with the tenant set
(``SET LOCAL proj.tenant``, which row-level security policies read).

Set the tenant for a request with :func:`set_tenant` (or ``with
tenant(slug):``); a run with no tenant has ``proj.tenant`` unset, so a
policy that compares with it sees no rows (it fails closed).

The ledger's own work (the relay, the reconciler, claims, the console, the
operator's commands) reads every tenant's jobs: it runs in the system scope
(``with system_scope():``, or :func:`scope_system` on a connection's
transaction), which sets ``proj.scope`` to ``system`` the same way. The
``jobs`` table's policy lets a transaction see a row of its own tenant, or
any row in the system scope; one with neither sees no tenant's jobs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from celery.signals import before_task_publish
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.trace import get_current_span
from sqlalchemy import event, orm, text

HEADER = "proj_context"
"""The message header that carries a job's context."""
TENANT_SETTING = "proj.tenant"
"""The PostgreSQL setting a run's (and a request's) transactions begin with."""
SCOPE_SETTING = "proj.scope"
"""The PostgreSQL setting of the ledger's own transactions (:func:`system_scope`)."""
SYSTEM = "system"
TRACE_FIELDS = ("traceparent", "tracestate")

tenant_var: ContextVar[str | None] = ContextVar("proj_tenant", default=None)
request_id_var: ContextVar[str | None] = ContextVar("proj_request_id", default=None)
system_var: ContextVar[bool] = ContextVar("proj_system_scope", default=False)
_carried: dict[str, ContextVar[str | None]] = {"tenant": tenant_var, "request_id": request_id_var}


@dataclass(frozen=True)
class RunningJob:
    """The job whose run is in progress in this context (for logs and metrics)."""

    job_id: str
    task: str
    attempt: int
    queue: str | None


running_job: ContextVar[RunningJob | None] = ContextVar("proj_running_job", default=None)


def carry(name: str, variable: ContextVar[str | None]) -> None:
    """Carry ``variable`` with every job from now on, under ``name``: its
    value at enqueue is its value during the run."""
    if name in TRACE_FIELDS:
        raise ValueError(f"{name} is carried already, from the current span")
    _carried[name] = variable


def set_tenant(slug: str | None) -> None:
    """The tenant of what this context does from now on (a request's, say)."""
    tenant_var.set(slug)


def current_tenant() -> str | None:
    """The tenant of this context: set by :func:`set_tenant`, a token's, or a
    running job's; None where tenants are not used."""
    return tenant_var.get()


@contextmanager
def tenant(slug: str | None) -> Iterator[None]:
    """The tenant of what runs inside the block."""
    token = tenant_var.set(slug)
    try:
        yield
    finally:
        tenant_var.reset(token)


@contextmanager
def system_scope() -> Iterator[None]:
    """Every tenant's jobs, for what runs inside the block: each session
    transaction begun there sets ``proj.scope`` (the ledger's own work, the
    console, operators' commands; never a tenant's request)."""
    token = system_var.set(True)
    try:
        yield
    finally:
        system_var.reset(token)


def scope_system(connection: Any) -> None:
    """Put ``connection``'s transaction (begun, Core) in the system scope, on
    PostgreSQL (``SET LOCAL``: it ends with the transaction)."""
    if connection.dialect.name == "postgresql":
        connection.execute(_SET, {"name": SCOPE_SETTING, "value": SYSTEM})


_SET = text("SELECT set_config(:name, :value, true)")


def capture() -> dict[str, str]:
    """The current context, as a job keeps it (only the fields that are set)."""
    found = {name: value for name, var in _carried.items() if (value := var.get()) is not None}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    found.update({k: v for k, v in carrier.items() if k in TRACE_FIELDS})
    return found


@contextmanager
def restored(carried: Mapping[str, Any] | None) -> Iterator[None]:
    """Inside the block, the context a job was enqueued with: every carried
    variable as it was (unset ones unset), and its trace context attached
    unless a span is current already (the Celery instrumentation's run span,
    itself in that trace: the run's spans are its children)."""
    carried = carried or {}
    with ExitStack() as stack:
        for name, var in _carried.items():
            value = carried.get(name)
            token = var.set(value if isinstance(value, str) else None)
            stack.callback(var.reset, token)
        trace = {k: str(carried[k]) for k in TRACE_FIELDS if k in carried}
        if trace and not get_current_span().get_span_context().is_valid:
            attached = otel_context.attach(propagate.extract(trace))
            stack.callback(otel_context.detach, attached)
        yield


def add_to_headers(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Celery's ``before_task_publish``: a plain ``.delay()`` carries the
    context too (a ledger job's message has it already)."""
    if headers is not None and HEADER not in headers:
        headers[HEADER] = capture()


def install() -> None:
    """Carry contexts in plain messages, and begin every session's
    transactions with the tenant (idempotent)."""
    if not event.contains(orm.Session, "after_begin", set_tenant_on_begin):
        event.listen(orm.Session, "after_begin", set_tenant_on_begin)
    before_task_publish.connect(add_to_headers, weak=False, dispatch_uid="proj.jobs.context")


def set_tenant_on_begin(session: orm.Session, transaction: Any, connection: Any) -> None:
    """A session's ``after_begin``: on PostgreSQL, the transaction's tenant,
    and the system scope inside :func:`system_scope` (``SET LOCAL``, so they
    end with the transaction and never outlive it on a pooled connection)."""
    slug, system = tenant_var.get(), system_var.get()
    if (slug is None and not system) or connection.dialect.name != "postgresql":
        return
    if slug is None:
        connection.execute(_SET, {"name": SCOPE_SETTING, "value": SYSTEM})
    elif not system:
        connection.execute(_SET, {"name": TENANT_SETTING, "value": slug})
    else:
        connection.execute(
            text("SELECT set_config(:tenant, :slug, true), set_config(:scope, :system, true)"),
            {"tenant": TENANT_SETTING, "slug": slug, "scope": SCOPE_SETTING, "system": SYSTEM},
        )
