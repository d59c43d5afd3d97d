"""``send_email``: alerts from policies, sent by the manager, never the child.

Arguments are checked before anything is sent (strings where strings are
expected, addresses that parse, no line breaks in headers, bounded sizes);
the number of emails is limited per run and per hour for each policy (and
each tenant); credentials come from the manager's configuration (the
environment or a file), never from policy code unless the policy passes
``auth_user`` / ``auth_password`` itself. A dry run (``cmpolicy try``, the
pytest plugin) records messages instead of sending them.

smtplib's errors are translated into MailError at this boundary.
"""

from __future__ import annotations

import logging
import os
import re
import smtplib
import ssl
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from manager.errors import ConfigurationError, ManagerError, OperationRefused

logger = logging.getLogger(__name__)

MAX_SUBJECT_CHARS = 900
MAX_BODY_BYTES = 64 * 1024
MAX_RECIPIENTS = 50
MAX_ADDRESS_CHARS = 254
# A deliberately plain address rule: local@domain with no spaces, quotes,
# angle brackets or line breaks, so nothing can smuggle a header.
ADDRESS_RE = re.compile(r"\A[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+"
                        r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\Z")

SECURITY_MODES = ("none", "starttls", "tls")
PASSWORD_ENV = "CMPOLICY_SMTP_PASSWORD"


class MailError(ManagerError):
    """Raised when the mail server refused, timed out or could not be reached."""


class MailLimitExceeded(OperationRefused):
    """Raised when a policy or tenant went over its email budget."""


@dataclass(frozen=True)
class Email:
    """A checked message, ready to send or to record."""

    subject: str
    message: str
    from_email: str
    recipient_list: tuple[str, ...]
    auth_user: str | None = None
    auth_password: str | None = field(default=None, repr=False)

    def to_message(self) -> EmailMessage:
        mail = EmailMessage()
        mail["Subject"] = self.subject
        mail["From"] = self.from_email
        mail["To"] = ", ".join(self.recipient_list)
        mail["Date"] = formatdate(localtime=True)
        mail["Message-ID"] = make_msgid(domain="celery-policy-manager")
        mail.set_content(self.message, charset="utf-8")
        return mail


def check_email(subject, message, from_email, recipient_list,
                auth_user=None, auth_password=None) -> Email:
    """Check every argument of send_email; return the message or refuse."""
    for what, value in (("subject", subject), ("message", message),
                        ("from_email", from_email)):
        if not isinstance(value, str):
            raise OperationRefused(f"send_email: {what} must be a string")
    if "\r" in subject or "\n" in subject:
        raise OperationRefused("send_email: the subject must be one line"
                               " (no line breaks)")
    if len(subject) > MAX_SUBJECT_CHARS:
        raise OperationRefused(f"send_email: the subject is longer than"
                               f" {MAX_SUBJECT_CHARS} characters")
    if len(message.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
        raise OperationRefused(f"send_email: the message is larger than"
                               f" {MAX_BODY_BYTES} bytes")
    _check_address("from_email", from_email)
    if isinstance(recipient_list, str) or \
            not isinstance(recipient_list, (list, tuple)):
        raise OperationRefused("send_email: recipient_list must be a list of"
                               " addresses")
    if not recipient_list:
        raise OperationRefused("send_email: recipient_list is empty")
    if len(recipient_list) > MAX_RECIPIENTS:
        raise OperationRefused(f"send_email: more than {MAX_RECIPIENTS}"
                               " recipients")
    for address in recipient_list:
        _check_address("recipient_list", address)
    for what, value in (("auth_user", auth_user),
                        ("auth_password", auth_password)):
        if value is not None and (not isinstance(value, str) or
                                  "\n" in value or "\r" in value):
            raise OperationRefused(f"send_email: {what} must be a string on"
                                   " one line")
    return Email(subject, message, from_email, tuple(recipient_list),
                 auth_user, auth_password)


def _check_address(what: str, address) -> None:
    if not isinstance(address, str) or len(address) > MAX_ADDRESS_CHARS \
            or not ADDRESS_RE.match(address):
        raise OperationRefused(f"send_email: {what}: {address!r:.80} is not"
                               " an email address")


@dataclass(frozen=True)
class SmtpSettings:
    """Where and how the manager sends mail."""

    host: str = "127.0.0.1"
    port: int = 25
    security: str = "none"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 10.0

    def __post_init__(self):
        if self.security not in SECURITY_MODES:
            raise ConfigurationError(f"SMTP security must be one of"
                                     f" {', '.join(SECURITY_MODES)}, not"
                                     f" {self.security!r}")

    @classmethod
    def from_options(cls, *, host: str, port: int | None = None,
                     security: str = "none", user: str | None = None,
                     password_file: str | None = None,
                     timeout_s: float = 10.0) -> "SmtpSettings":
        """Build settings; the password from a file or $CMPOLICY_SMTP_PASSWORD."""
        password = os.environ.get(PASSWORD_ENV)
        if password_file:
            try:
                password = Path(password_file).read_text().strip()
            except OSError as exc:
                raise ConfigurationError(f"cannot read the SMTP password file"
                                         f" {password_file}: {exc.strerror}"
                                         ) from exc
        if port is None:
            port = {"none": 25, "starttls": 587, "tls": 465}.get(security, 25)
        return cls(host, port, security, user, password, timeout_s)


class _Budget:
    """Sliding one-hour windows of send times, per policy and per tenant."""

    def __init__(self, per_hour: int, clock: Callable[[], float]):
        self.per_hour = per_hour
        self.clock = clock
        self.sent: dict[str, deque] = defaultdict(deque)

    def check(self, key: str, what: str, *,
              per_hour: int | None = None) -> None:
        limit = self.per_hour if per_hour is None else min(per_hour,
                                                            self.per_hour)
        window = self.sent[key]
        now = self.clock()
        while window and window[0] <= now - 3600:
            window.popleft()
        if len(window) >= limit:
            raise MailLimitExceeded(f"send_email: {what} has sent {limit}"
                                    " emails in the last hour; nothing was"
                                    " sent")

    def add(self, key: str) -> None:
        self.sent[key].append(self.clock())


class Mailer:
    """Checks, limits and delivers (or records) policy emails.

    ``send`` takes the policy and tenant the call came from, so hourly
    budgets are kept per policy and per tenant across runs.
    """

    def __init__(self, settings: SmtpSettings | None = None, *,
                 per_hour_policy: int = 20, per_hour_tenant: int = 100,
                 dry_run: bool = False,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.dry_run = dry_run or settings is None
        self._policy_budget = _Budget(per_hour_policy, clock)
        self._tenant_budget = _Budget(per_hour_tenant, clock)
        self._lock = threading.Lock()
        self.outbox: list[Email] = []

    def send(self, email: Email, *, policy: str = "",
             tenant: str = "default",
             tenant_per_hour: int | None = None) -> dict:
        with self._lock:
            self._policy_budget.check(f"policy:{policy}",
                                      f"policy {policy!r}")
            self._tenant_budget.check(f"tenant:{tenant}",
                                      f"tenant {tenant!r}",
                                      per_hour=tenant_per_hour)
            # Counted before delivery: a server that fails after taking
            # the message must not let a policy retry without limit.
            self._policy_budget.add(f"policy:{policy}")
            self._tenant_budget.add(f"tenant:{tenant}")
        if self.dry_run:
            self.outbox.append(email)
            logger.info("policy %s: recorded (not sent) email %r to %s",
                        policy, email.subject, ", ".join(email.recipient_list))
            return {"sent": False, "recorded": True,
                    "recipients": list(email.recipient_list)}
        self._deliver(email)
        logger.info("policy %s: sent email %r to %s", policy, email.subject,
                    ", ".join(email.recipient_list))
        return {"sent": True, "recipients": list(email.recipient_list)}

    def _deliver(self, email: Email) -> None:
        settings = self.settings
        user = email.auth_user if email.auth_user is not None else settings.user
        password = email.auth_password if email.auth_user is not None \
            else settings.password
        where = f"{settings.host}:{settings.port}"
        try:
            if settings.security == "tls":
                server = smtplib.SMTP_SSL(
                    settings.host, settings.port, timeout=settings.timeout_s,
                    context=ssl.create_default_context())
            else:
                server = smtplib.SMTP(settings.host, settings.port,
                                      timeout=settings.timeout_s)
            with server:
                if settings.security == "starttls":
                    server.starttls(context=ssl.create_default_context())
                if user:
                    server.login(user, password or "")
                refused = server.send_message(
                    email.to_message(), from_addr=email.from_email,
                    to_addrs=list(email.recipient_list))
        except smtplib.SMTPAuthenticationError as exc:
            raise MailError(f"the mail server {where} refused the login:"
                            f" {exc.smtp_code} {_text(exc.smtp_error)}") from exc
        except smtplib.SMTPRecipientsRefused as exc:
            raise MailError(f"the mail server {where} refused every"
                            f" recipient: {', '.join(exc.recipients)}") from exc
        except smtplib.SMTPResponseException as exc:
            raise MailError(f"the mail server {where} refused the message:"
                            f" {exc.smtp_code} {_text(exc.smtp_error)}") from exc
        except (smtplib.SMTPException, OSError) as exc:
            if isinstance(exc, TimeoutError) or \
                    isinstance(exc.__context__, TimeoutError):
                raise MailError(f"the mail server {where} did not answer"
                                f" within {settings.timeout_s:g} s") from exc
            raise MailError(f"cannot send through the mail server {where}:"
                            f" {exc}") from exc
        if refused:
            raise MailError(f"the mail server {where} refused some"
                            f" recipients: {', '.join(sorted(refused))}"
                            " (the others were sent the message)")


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
