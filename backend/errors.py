"""Every error leaves the gateway in one shape (docs/contracts.md, "HTTP API"):

``{"error": {"message": str, "type": str, "param": str | None, "code": str}}``

``param`` names the field at fault as a dotted path (``height``, ``images.1``). Bad input is always a 4xx
naming the field; only a bug in the gateway itself answers 500.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from echo4o.logging import get_logger

log = get_logger(__name__)

# Where FastAPI says a value came from; not part of the field's name.
_LOCATION_PREFIXES = {"body", "query", "path", "header", "cookie", "form"}

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error answered to the client. Raise it anywhere below a route; the handler shapes it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        type: str | None = None,  # noqa: A002 - the contract's field name
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _STATUS_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None, code: str) -> dict[str, Any]:  # noqa: A002
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(param: str | None, message: str, *, code: str = "invalid_value", status: int = 422) -> ApiError:
    """A 4xx about one field."""
    return ApiError(status, message, code=code, param=param)


def not_found(what: str, ident: str, *, param: str | None = None) -> ApiError:
    return ApiError(404, f"{what} {ident!r} does not exist", code="not_found", param=param)


def field_path(loc: Sequence[Any], *, prefix: str | None = None) -> str | None:
    """``("body", "images", 1)`` -> ``images.1``; pydantic's union/tag steps are dropped."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in _LOCATION_PREFIXES:
        parts = parts[1:]
    # A model validator reports at the model itself; a union adds the branch name ("function-after[...]").
    parts = [p for p in parts if not p.startswith(("function-", "tagged-union[", "union["))]
    if prefix:
        parts = [prefix, *parts]
    return ".".join(parts) or None


def _message_for(err: Mapping[str, Any], param: str | None) -> str:
    if err.get("type") == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON ({reason}): send a JSON object with Content-Type application/json"
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    return f"{param}: {msg}" if param else msg


def from_validation_errors(errors: Iterable[Mapping[str, Any]], *, prefix: str | None = None) -> ApiError:
    """The first failing field becomes ``param``; the message lists every failure, each naming its field."""
    errors = list(errors)
    if not errors:
        return invalid(None, "invalid request")
    params = [None if e.get("type") == "json_invalid" else field_path(e.get("loc", ()), prefix=prefix)
              for e in errors]
    # A cross-field validator has no location of its own; its message names the fields (e.g. "cfg_interval").
    first = next((p for p in params if p), None)
    message = "; ".join(_message_for(e, p) for e, p in zip(errors, params, strict=True))
    if len(message) > 2000:
        message = message[:2000] + "..."
    return invalid(first, message)


def from_pydantic(err: ValidationError, *, prefix: str | None = None) -> ApiError:
    return from_validation_errors(err.errors(include_url=False, include_context=False), prefix=prefix)


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    if exc.status >= 500:
        log.warning("request failed", extra={"path": request.url.path, "code": exc.code, "status": exc.status})
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _not_json(request: Request, errors: Sequence[Mapping[str, Any]]) -> ApiError | None:
    """A JSON route given a body of another type (text/plain, a form): 415 naming the type to send, rather than a
    422 saying the body is not an object."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return None
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") in ("model_attributes_type", "dict_type")
           for e in errors):
        return ApiError(415, f"Content-Type must be application/json, got {media_type or 'none'!r}: send the "
                             "fields as a JSON object", code="unsupported_media_type")
    return None


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    err = _not_json(request, exc.errors()) or from_validation_errors(exc.errors())
    return JSONResponse(err.body(), status_code=err.status)


async def _pydantic_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationError)
    err = from_pydantic(exc)
    return JSONResponse(err.body(), status_code=err.status)


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout"}.get(exc.status_code,
                                                                                     f"http_{exc.status_code}")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 400 and message == "There was an error parsing the body":
        # FastAPI's answer to a body it cannot decode (not UTF-8, a broken multipart frame): bad input like
        # malformed JSON, so the same 422 that names the fix
        err = ApiError(422, "the body could not be parsed: send a JSON object (Content-Type application/json, "
                            "UTF-8) or a well-formed multipart/form-data form", code="invalid_body")
        return JSONResponse(err.body(), status_code=err.status)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}: see /docs for the API"
    body = error_body(message, type=_STATUS_TYPES.get(exc.status_code, "api_error"), param=None, code=code)
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable", extra={"path": request.url.path, "error": f"{type(exc).__name__}: {exc}"})
    body = error_body(
        "the job database is busy or unreachable; retry shortly (see Retry-After). If it persists, check "
        "ECHO4O_DATABASE_URL and that the database is up",
        type="service_unavailable", param=None, code="database_unavailable",
    )
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"path": request.url.path, "method": request.method})
    body = error_body(
        "internal error in the gateway; its log has the details", type="api_error", param=None, code="internal_error"
    )
    return JSONResponse(body, status_code=500)


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(ValidationError, _pydantic_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    # pool exhausted under load, database restarting or unreachable: the client may retry
    app.add_exception_handler(sa_exc.TimeoutError, _database_unavailable)
    app.add_exception_handler(sa_exc.OperationalError, _database_unavailable)
    app.add_exception_handler(sa_exc.DisconnectionError, _database_unavailable)
    app.add_exception_handler(Exception, _unhandled)
