"""The exceptions of the flexmesh client: every one is a ``ClientError`` whose message is
the agent's own words (the ``error`` of its JSON answer) or says what failed on the way.
"""

from __future__ import annotations


class ClientError(Exception):
    """A request to the agent failed. ``message`` is the agent's own text (its JSON
    ``error``) or says what went wrong on the way; ``status`` is the HTTP status of the
    answer, or None when the failure did not come with one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class BadRequest(ClientError):
    """The agent refused the request (400): the message says what is wrong with it."""


class Forbidden(ClientError):
    """The agent refused the request to this user (403): another user's job, say."""


class NotFound(ClientError):
    """No such job here (404), or an endpoint this agent does not have, or a job forgotten
    (its retention ran out) while its output was being read (``status`` None)."""


class AgentUnavailable(ClientError):
    """The agent cannot be reached: its socket is missing, nobody listens on it, this user
    may not open it, or the connection failed. ``cause`` is the error that said so."""

    def __init__(self, message: str, socket: str, cause: BaseException) -> None:
        super().__init__(message)
        self.socket = socket
        self.cause = cause


class ProtocolError(ClientError):
    """The agent answered something this client does not understand (a body that is not
    JSON, a status it does not expect)."""


class StreamError(ClientError):
    """Reading a job's output failed part way; ``cause`` is the error that said so."""

    def __init__(self, message: str, job: str, cause: BaseException | None) -> None:
        super().__init__(message)
        self.job = job
        self.cause = cause


class StreamEnded(StreamError):
    """The agent closed a job's output before its end record (it stopped or restarted):
    reading again gives the rest."""


class WaitTimeout(ClientError):
    """A wait's ``timeout`` passed with the job still queued or running (it goes on)."""

    def __init__(self, message: str, job: str) -> None:
        super().__init__(message)
        self.job = job


def from_status(status: int, message: str) -> ClientError:
    """The exception for an error answer of the agent."""
    kind = {400: BadRequest, 403: Forbidden, 404: NotFound}.get(status, ClientError)
    return kind(message, status)
