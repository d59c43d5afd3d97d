"""send_email through a real SMTP server on 127.0.0.1 (aiosmtpd)."""

import dataclasses
import email
import email.policy
import socket
import threading

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from manager.errors import OperationRefused
from manager.mailer import (
    MailError,
    Mailer,
    MailLimitExceeded,
    SmtpSettings,
    check_email,
)
from manager.operations import Operations
from manager.simcluster import SimulatedCluster
from manager.tenants import unrestricted
from sandboxhost.errors import OperationError


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Inbox:
    """An aiosmtpd handler that keeps what it received, or refuses."""

    def __init__(self, refuse=None):
        self.received = []
        self.refuse = refuse

    async def handle_DATA(self, server, session, envelope):
        if self.refuse:
            return self.refuse
        parsed = email.message_from_bytes(envelope.content,
                                          policy=email.policy.default)
        self.received.append((envelope.mail_from, envelope.rcpt_tos, parsed,
                              session.authenticated))
        return "250 OK"


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = auth_data.login == b"ops" and auth_data.password == b"secret"
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp():
    servers = []

    def start(**kw):
        handler = Inbox(kw.pop("refuse", None))
        port = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port,
                                **kw)
        controller.start()
        servers.append(controller)
        return handler, port

    yield start
    for controller in servers:
        controller.stop()


def mailer_for(port, **kw):
    return Mailer(SmtpSettings(port=port, timeout_s=2.0, **kw))


MAIL = dict(subject="nightly_export did not run",
            message="No successful export between 02:00 and 03:00.",
            from_email="celery-policies@example.com",
            recipient_list=["oncall@example.com", "lead@example.com"])


def test_mail_arrives_with_sender_recipients_subject_and_body(smtp):
    inbox, port = smtp()
    result = mailer_for(port).send(check_email(**MAIL), policy="nightly")
    assert result == {"sent": True, "recipients": MAIL["recipient_list"]}
    (sender, recipients, message, _), = inbox.received
    assert sender == MAIL["from_email"]
    assert recipients == MAIL["recipient_list"]
    assert message["Subject"] == MAIL["subject"]
    assert message["From"] == MAIL["from_email"]
    assert message.get_content().strip() == MAIL["message"]


def test_non_ascii_text_is_encoded(smtp):
    inbox, port = smtp()
    mail = dict(MAIL, subject="Ærger: køen er fuld ✉",
                message="Größe der Warteschlange: 120 — zu viel.")
    mailer_for(port).send(check_email(**mail))
    message = inbox.received[0][2]
    assert message["Subject"] == mail["subject"]
    assert message.get_content().strip() == mail["message"]
    assert message.get_content_charset() == "utf-8"


def test_login_with_configured_credentials(smtp):
    inbox, port = smtp(authenticator=authenticator, auth_require_tls=False)
    mailer = mailer_for(port, user="ops", password="secret")
    mailer.send(check_email(**MAIL))
    assert inbox.received[0][3] is True


def test_policy_credentials_are_used_only_when_given(smtp):
    inbox, port = smtp(authenticator=authenticator, auth_require_tls=False)
    mailer = mailer_for(port, user="ops", password="wrong")
    mailer.send(check_email(**MAIL, auth_user="ops", auth_password="secret"))
    with pytest.raises(MailError) as info:
        mailer.send(check_email(**MAIL))
    assert str(info.value).startswith(
        f"the mail server 127.0.0.1:{port} refused the login: 535")


def test_server_that_refuses_is_a_clear_error(smtp):
    _, port = smtp(refuse="550 mailbox unavailable")
    with pytest.raises(MailError) as info:
        mailer_for(port).send(check_email(**MAIL))
    assert str(info.value) == (f"the mail server 127.0.0.1:{port} refused the"
                               " message: 550 mailbox unavailable")


def test_server_that_is_down_is_a_clear_error():
    port = free_port()
    with pytest.raises(MailError) as info:
        mailer_for(port).send(check_email(**MAIL))
    assert str(info.value).startswith(
        f"cannot send through the mail server 127.0.0.1:{port}:")


def test_server_that_never_answers_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(
        listener.accept()), daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    mailer = Mailer(SmtpSettings(port=port, timeout_s=0.5))
    try:
        with pytest.raises(MailError) as info:
            mailer.send(check_email(**MAIL))
        assert str(info.value) == (f"the mail server 127.0.0.1:{port} did not"
                                   " answer within 0.5 s")
    finally:
        listener.close()
        for conn, _ in accepted:
            conn.close()


@pytest.mark.parametrize("change, message", [
    (dict(subject="hi\nBcc: all@example.com"),
     "send_email: the subject must be one line (no line breaks)"),
    (dict(subject="x" * 901),
     "send_email: the subject is longer than 900 characters"),
    (dict(message="x" * 70_000),
     "send_email: the message is larger than 65536 bytes"),
    (dict(from_email="a@b.c\nBcc: x@y.z"),
     "send_email: from_email: 'a@b.c\\nBcc: x@y.z' is not an email address"),
    (dict(recipient_list="oncall@example.com"),
     "send_email: recipient_list must be a list of addresses"),
    (dict(recipient_list=[]), "send_email: recipient_list is empty"),
    (dict(recipient_list=["not an address"]),
     "send_email: recipient_list: 'not an address' is not an email address"),
    (dict(recipient_list=["x@y.z"] * 51),
     "send_email: more than 50 recipients"),
    (dict(subject=3), "send_email: subject must be a string"),
    (dict(auth_user="u\r\nX: y"),
     "send_email: auth_user must be a string on one line"),
])
def test_bad_arguments_are_refused_before_sending(change, message):
    with pytest.raises(OperationRefused) as info:
        check_email(**{**MAIL, **change})
    assert str(info.value) == message


def test_hourly_budget_per_policy_and_per_tenant(smtp):
    inbox, port = smtp()
    now = [1000.0]
    mailer = Mailer(SmtpSettings(port=port), per_hour_policy=2,
                    per_hour_tenant=3, clock=lambda: now[0])
    mail = check_email(**MAIL)
    mailer.send(mail, policy="a", tenant="t1")
    mailer.send(mail, policy="a", tenant="t1")
    with pytest.raises(MailLimitExceeded) as info:
        mailer.send(mail, policy="a", tenant="t1")
    assert str(info.value) == ("send_email: policy 'a' has sent 2 emails in"
                               " the last hour; nothing was sent")
    mailer.send(mail, policy="b", tenant="t1")
    with pytest.raises(MailLimitExceeded):
        mailer.send(mail, policy="c", tenant="t1")
    mailer.send(mail, policy="c", tenant="t2")  # another tenant is not limited
    now[0] += 3601
    mailer.send(mail, policy="a", tenant="t1")
    assert len(inbox.received) == 5


def test_per_run_limit_in_operations(smtp):
    _, port = smtp()
    sim = SimulatedCluster()
    tenant = dataclasses.replace(unrestricted(), emails_per_run=1)
    ops = Operations(sim, sim, mailer_for(port), tenant=tenant, policy="p")
    args = dict(MAIL, auth_user=None, auth_password=None)
    ops("send_email", args)
    with pytest.raises(OperationError) as info:
        ops("send_email", args)
    assert info.value.message == ("send_email: this run has sent 1 emails,"
                                  " the most one run may send; nothing was"
                                  " sent")


def test_dry_run_records_and_never_connects():
    mailer = Mailer(None)
    result = mailer.send(check_email(**MAIL), policy="p")
    assert result == {"sent": False, "recorded": True,
                      "recipients": MAIL["recipient_list"]}
    assert mailer.outbox[0].subject == MAIL["subject"]


def test_password_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CMPOLICY_SMTP_PASSWORD", "from-env")
    assert SmtpSettings.from_options(host="h").password == "from-env"
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    settings = SmtpSettings.from_options(host="h", security="starttls",
                                         password_file=str(secret))
    assert (settings.password, settings.port) == ("from-file", 587)
    assert "from-file" not in repr(settings)


def test_nightly_report_example_sends_its_mail_end_to_end(smtp, examples):
    """The example policy, through the sandbox, to a real SMTP server."""
    import datetime as dt

    from sandboxhost.host import Host
    from manager.runner import PolicyRunner, load_file

    nightly = next(p for p in examples
                   if p.name == "nightly-report-missing.policy")
    inbox, port = smtp()
    cluster = SimulatedCluster()
    cluster.add_task("reports.tasks.nightly_export")
    now = dt.datetime(2026, 12, 4, 3, 0, tzinfo=dt.timezone.utc)
    with Host() as host:
        runner = PolicyRunner(host)
        policy = load_file(runner, nightly)
        report = runner.run(policy, cluster=cluster, stats=cluster,
                            mailer=mailer_for(port), now=now)
    assert report.ok, report.error
    (sender, recipients, message, _), = inbox.received
    assert (sender, recipients) == ("celery-policies@example.com",
                                    ["oncall@example.com"])
    assert message["Subject"] == "nightly_export did not run"


def test_a_server_that_refuses_is_a_policy_error_at_the_line(smtp, examples):
    import datetime as dt

    from sandboxhost.host import Host
    from manager.runner import PolicyRunner, load_file

    nightly = next(p for p in examples
                   if p.name == "nightly-report-missing.policy")
    _, port = smtp(refuse="554 no thanks")
    cluster = SimulatedCluster()
    now = dt.datetime(2026, 12, 4, 3, 0, tzinfo=dt.timezone.utc)
    with Host() as host:
        runner = PolicyRunner(host)
        report = runner.run(load_file(runner, nightly), cluster=cluster,
                            stats=cluster, mailer=mailer_for(port), now=now)
    assert not report.ok
    assert (report.error.section, report.error.line) == ("apply", 11)
    assert report.error.type_name == "MailError"
    assert "554 no thanks" in report.error.message
