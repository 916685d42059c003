"""The one botocore client behind the ObjectStore interface (the only botocore importer).

One client is shared by worker threads (botocore clients are thread-safe, sessions are not);
every call runs through `trio.to_thread.run_sync` under one CapacityLimiter sized to the
connection pool. Retries happen inside the worker thread ("standard" mode, `max_attempts`
tries with exponential backoff), timeouts are short so shutdown stays prompt, and every
botocore exception leaves this module as an `errors.StoreError` carrying an errno.

botocore's own budget is short (non-throttling backoff is at most 0.05 * 2^i s: 0.75 s over
5 attempts), and its retry quota (500, 14 per retry) runs dry in an outage, after which it
retries nothing. So a request that still fails with a connection error, a timeout or a 5xx
is sent again from here, after 0.5, 1, 2, 4, 5, 5 ... s (trio sleeps: cancellable), until
`retry_time` seconds have passed since its first attempt (docs/SEMANTICS.md "Failures").
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import email.utils
import errno
import functools
import hashlib
import http.client
import logging
import re
import ssl
import time
import urllib.parse
from xml.etree import ElementTree
from xml.sax.saxutils import escape as xml_escape

import botocore.config
import botocore.exceptions
import botocore.httpsession
import botocore.parsers
import botocore.session
import trio

from . import direct_requests
from .checksums import crc32_base64, md5_base64
from .config import StoreConfig
from .errors import (
    AccessDenied,
    FsError,
    IntegrityError,
    NoSuchBucket,
    NoSuchUpload,
    NotFound,
    PreconditionFailed,
    StoreError,
    Unreachable,
    run_parallel,
    transient,
)
from .object_store import (
    KEPT_HEADERS,
    ListPage,
    ObjectInfo,
    PendingUpload,
    PutOptions,
    UploadedPart,
)

log = logging.getLogger(__name__)

RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)  # between whole-request retries, then RETRY_DELAY_MAX
RETRY_DELAY_MAX = 5.0
DIRECT_PUT_MAX = 1024 * 1024  # larger bodies go through botocore (checksums in a thread)
# larger copies go through botocore: the server's copying dwarfs its ~1.7 ms of CPU, and a
# long copy may keep its answer waiting past a read timeout
DIRECT_COPY_MAX = 8 * 1024 * 1024
DIRECT_PAUSE = 60.0  # after DIRECT_MISSES requests of one kind in a row get no plain answer
DIRECT_MISSES = 5
S3_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
OWNER_ONLY_ACLS = ("private", "bucket-owner-read", "bucket-owner-full-control")
CREDENTIALS_REFRESH = 60.0  # seconds a frozen copy of refreshable credentials is used
# S3's answers to a request signed for (or sent to) the wrong region; with the header
# x-amz-bucket-region they name the bucket's own (HEAD: 301 or 400 without a body)
REGION_REDIRECTS = (301, 307, 400)
REGION_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_BODY_REGION = re.compile(rb"<Region>([a-z0-9-]{1,63})</Region>")  # AuthorizationHeaderMalformed

_CLIENT_ERRORS: dict[str, type[StoreError]] = {
    "NoSuchKey": NotFound,
    "404": NotFound,
    "NotFound": NotFound,
    "NoSuchBucket": NoSuchBucket,
    "AccessDenied": AccessDenied,
    "403": AccessDenied,
    "InvalidAccessKeyId": AccessDenied,
    "SignatureDoesNotMatch": AccessDenied,
    "ExpiredToken": AccessDenied,
    "PreconditionFailed": PreconditionFailed,
    "412": PreconditionFailed,
    "NoSuchUpload": NoSuchUpload,
    "BadDigest": IntegrityError,
    "InvalidDigest": IntegrityError,
    "XAmzContentChecksumMismatch": IntegrityError,
}


# each of KEPT_HEADERS as botocore's parameter; storage class and encryption are the
# "storage" ones (a plain CopyObject needs them too), the rest go with new metadata only
_HEADER_ARGS = {
    "content-encoding": "ContentEncoding",
    "cache-control": "CacheControl",
    "content-disposition": "ContentDisposition",
    "content-language": "ContentLanguage",
    "expires": "Expires",
    "x-amz-website-redirect-location": "WebsiteRedirectLocation",
    "x-amz-storage-class": "StorageClass",
    "x-amz-server-side-encryption": "ServerSideEncryption",
    "x-amz-server-side-encryption-aws-kms-key-id": "SSEKMSKeyId",
    "x-amz-server-side-encryption-bucket-key-enabled": "BucketKeyEnabled",
}
assert set(_HEADER_ARGS) == set(KEPT_HEADERS)
_STORAGE_ARGS = ("StorageClass", "ServerSideEncryption", "SSEKMSKeyId", "BucketKeyEnabled")
# the parameters of a PutObject sent directly, as headers
_ARG_HEADERS = {arg: name for name, arg in _HEADER_ARGS.items()} | {
    "ContentType": "content-type", "ACL": "x-amz-acl", "Tagging": "x-amz-tagging"}


def _arg_headers(args: dict) -> dict[str, str]:
    """botocore parameters of a new object (`_put_args`, `_storage_args`) as the headers
    of a direct request (metadata aside: x-amz-meta-*)."""
    return {_ARG_HEADERS[arg]: _header_value(value) for arg, value in args.items()
            if arg in _ARG_HEADERS}


def _answered(headers: dict[str, str]) -> float:
    """The server's Date header (seconds since the epoch), 0.0 when missing or no date.
    The last one is kept: a listing's pipelined HEADs are answered within a second or so."""
    text = headers.get("date")
    if text is None:
        return 0.0
    if text != _last_date[0]:
        try:
            _last_date[:] = [text, parse_timestamp(text).timestamp()]
        except (ValueError, TypeError):
            return 0.0
    return _last_date[1]


_last_date: list = ["", 0.0]  # the Date header `_answered` parsed last, and its time


def kept_headers(headers: dict[str, str]) -> tuple[dict[str, str], int]:
    """KEPT_HEADERS and the tag count of a HEAD's answer (header names lower case)."""
    kept = {name: headers[name] for name in KEPT_HEADERS if headers.get(name)}
    try:
        count = max(0, int(headers.get("x-amz-tagging-count", "0")))
    except ValueError:
        count = 1  # some tags, how many unsaid: GetObjectTagging tells
    return kept, count


def _kept_args(headers: dict[str, str]) -> dict:
    """An object's KEPT_HEADERS as botocore parameters. An Expires that is no date is
    dropped (botocore would refuse the request); a KMS key goes only with KMS encryption."""
    args: dict = {}
    for name, arg in _HEADER_ARGS.items():
        value = headers.get(name)
        if not value:
            continue
        if arg == "Expires":
            try:
                value = parse_timestamp(value)
            except Exception:
                log.debug("Expires %r is not a date: not kept", value)
                continue
        elif arg == "BucketKeyEnabled":
            value = value.strip().lower() == "true"
        args[arg] = value
    if not str(args.get("ServerSideEncryption", "")).startswith("aws:kms"):
        args.pop("SSEKMSKeyId", None)
        args.pop("BucketKeyEnabled", None)
    return args


def _header_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime.datetime):
        return email.utils.format_datetime(value.astimezone(datetime.UTC), usegmt=True)
    return str(value)


def payload_signing(config: StoreConfig) -> bool:
    """Whether SigV4 signs each body's SHA-256 (a third of the daemon's CPU while writing).

    botocore skips it over https when a checksum header is sent; "auto" does the same over
    http too, since every part and put carries a CRC32 or MD5 the server verifies. "on"
    keeps it: over plain http it is the only protection against a body altered in transit.
    """
    if config.sign_payload == "auto":
        return config.checksum == "off"
    return config.sign_payload == "on"


def _read_body_into(body, view: memoryview) -> int:
    """Read a response body straight into `view`: one copy from the socket and no new
    buffer, where `body.read()` allocates a fresh one (page faults) per GET. Reaches the
    http.client response under botocore's StreamingBody and urllib3's HTTPResponse (botocore
    asks urllib3 not to decode content, so these are the same bytes); falls back to read().
    """
    raw = getattr(body, "_raw_stream", None)
    response = getattr(raw, "_fp", None)
    if not isinstance(response, http.client.HTTPResponse):
        data = body.read(len(view))
        view[:len(data)] = data
        return len(data)
    got = 0
    while got < len(view):
        n = response.readinto(view[got:])
        if not n:
            break
        got += n
    if response.isclosed() and hasattr(raw, "release_conn"):
        raw.release_conn()  # read to the end: the connection goes back to the pool
    return got


def _translate(exc: Exception, what: str) -> FsError:
    """One botocore exception → one of our errors with a one-line message (no URLs signed)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return _client_error(code, status, error.get("Message") or code, what)
    if isinstance(exc, botocore.exceptions.SSLError):
        return Unreachable(f"{what}: {exc} (an endpoint with a private CA needs "
                           "AWS_CA_BUNDLE, or ca_bundle in the profile)")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return AccessDenied(f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                            "AWS_SECRET_ACCESS_KEY, a profile, or instance credentials)")
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError,
                        botocore.exceptions.ConnectTimeoutError,
                        botocore.exceptions.ReadTimeoutError,
                        botocore.exceptions.ConnectionClosedError,
                        botocore.exceptions.HTTPClientError)):
        return Unreachable(f"{what}: endpoint unreachable after retries: {exc}")
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return StoreError(f"{what}: {exc}")
    raise exc


def _client_error(code: str, status: int | None, message: str, what: str) -> FsError:
    """S3's error code and HTTP status -> one of our errors (botocore's ClientError and a
    direct request's XML error alike)."""
    cls = _CLIENT_ERRORS.get(code) or _CLIENT_ERRORS.get(str(status)) or StoreError
    if code in ("EntityTooLarge",):
        return StoreError(f"{what}: {code}: {message}", errno.EFBIG)
    if code in ("InvalidRange",):
        return StoreError(f"{what}: {code}: {message}", errno.EINVAL)
    error = cls(f"{what}: {code or status}: {message}")
    error.transient = isinstance(status, int) and status >= 500 or code in (
        "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout")
    return error


# a direct request's 4xx with these codes goes again through botocore, which acts on them:
# it retries (timeouts, throttling), refreshes credentials, corrects its clock, or follows the
# bucket to its region; a signature we got wrong is also botocore's to send right
_BOTOCORE_HANDLES = frozenset({
    "RequestTimeout", "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequestsException", "ExpiredToken", "TokenRefreshRequired", "InvalidToken",
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "RequestTimeTooSkewed", "RequestExpired",
    "AuthorizationHeaderMalformed", "PermanentRedirect", "TemporaryRedirect", "Redirect",
    "IllegalLocationConstraintException", "AuthorizationQueryParametersError"})


def parse_error_answer(status: int, headers: dict[str, str], body: bytes
                       ) -> tuple[str, str] | None:
    """(code, message) of a 4xx answer with S3's XML error body (<Error><Code>...), when it
    is final: the same answer botocore would get and raise; None when botocore should send
    the request again (see _BOTOCORE_HANDLES, a redirect to the bucket's region, no XML)."""
    if not 400 <= status < 500 or status in (408, 429) or "x-amz-bucket-region" in headers:
        return None
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None
    code = root.findtext("Code") if root.tag == "Error" else None
    if not code or code in _BOTOCORE_HANDLES:
        return None
    return code, root.findtext("Message") or code


def parse_timestamp(text: str) -> datetime.datetime:
    """botocore's timestamp parser goes through dateutil: 13 % of the daemon's CPU in
    `ls -l` of a large directory (a LastModified per listed object). S3's two formats
    (ISO 8601 in bodies, RFC 1123 in headers) are parsed by the standard library."""
    try:
        if text[:1].isdigit():
            parsed = datetime.datetime.fromisoformat(text)
        else:
            parsed = email.utils.parsedate_to_datetime(text)
        if parsed.tzinfo is not None:
            return parsed
    except (TypeError, ValueError):
        pass
    return botocore.parsers.DEFAULT_TIMESTAMP_PARSER(text)


def parse_list_page(body: bytes) -> ListPage:
    """A ListObjectsV2 answer (ListBucketResult), keys URL-decoded if the server says so."""
    root = ElementTree.fromstring(body)
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if root.tag != ns + "ListBucketResult":
        raise ValueError(f"not a listing: {root.tag}")
    encoded = root.findtext(ns + "EncodingType") == "url"

    def text(element, name: str) -> str:
        value = element.findtext(ns + name)
        if value is None:
            raise ValueError(f"no {name}")
        return urllib.parse.unquote_plus(value) if encoded and name in ("Key", "Prefix") \
            else value

    objects = [ObjectInfo(key=text(c, "Key"), size=int(text(c, "Size")),
                          etag=c.findtext(ns + "ETag") or "",
                          last_modified=parse_timestamp(text(c, "LastModified")).timestamp(),
                          has_metadata=False)
               for c in root.iterfind(ns + "Contents")]
    prefixes = [text(p, "Prefix") for p in root.iterfind(ns + "CommonPrefixes")]
    truncated = root.findtext(ns + "IsTruncated", "false").lower() == "true"
    token = root.findtext(ns + "NextContinuationToken") if truncated else None
    if truncated and not token:
        raise ValueError("truncated without a continuation token")
    return ListPage(objects, prefixes, token)


def _complete_body(parts: list[dict]) -> bytes:
    """CompleteMultipartUpload's XML: each part's number and ETag (ETags are quoted hex)."""
    listed = "".join(f"<Part><PartNumber>{p['PartNumber']}</PartNumber>"
                     f"<ETag>{xml_escape(p['ETag'])}</ETag></Part>" for p in parts)
    return (f'<CompleteMultipartUpload xmlns="{S3_XMLNS}">{listed}'
            "</CompleteMultipartUpload>").encode()


def _xml_field(response: direct_requests.Response | None, root_name: str,
               field: str, default: str | None = None) -> str | None:
    """The text of `field` in a direct answer whose root element is `root_name` (`default`
    when it has none); None for no answer, another root (an <Error> sent with 200) or XML
    not understood."""
    if response is None:
        return None
    try:
        root = ElementTree.fromstring(response.body)
    except ElementTree.ParseError:
        return None
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if root.tag != ns + root_name:
        return None
    return root.findtext(ns + field) or default


def profile_exists(name: str) -> bool:
    """Whether ~/.aws/config or ~/.aws/credentials defines profile `name` (checked before
    mounting: botocore would only fail once the mount process runs)."""
    return name in botocore.session.Session().available_profiles


class RequestStats:
    """Requests by operation, errors by operation and code, and retries (also by key, for
    the few keys that needed any), as `s3stream status` shows them. Updated by botocore's
    hooks in worker threads: plain counter updates, which the GIL keeps whole."""

    KEYS = 1000  # keys remembered with their retries (the oldest are forgotten)

    def __init__(self) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.retries = 0
        self.retries_by_key: dict[str, int] = {}
        # direct requests (direct_requests.py) sent again through botocore, by operation
        self.fallbacks: collections.Counter[str] = collections.Counter()
        # the direct clients' own counters ("stale_replaced": kept-alive connections found
        # closed and replaced, no fallback, no failure): one Counter for the mount, which
        # the client of each region followed counts on in turn
        self.direct: collections.Counter[str] = collections.Counter()

    def done(self, operation: str, key: str, status: int, code: str, retries: int) -> None:
        self.requests[operation] += 1
        if status >= 300 and not (status == 304 or operation == "GetObject" and status == 206):
            self.errors[f"{operation} {code or status}"] += 1
        if retries:
            self.retries += retries
            self.retries_by_key[key] = self.retries_by_key.pop(key, 0) + retries
            if len(self.retries_by_key) > self.KEYS:
                del self.retries_by_key[next(iter(self.retries_by_key))]

    def failed(self, operation: str, exception: BaseException) -> None:
        self.requests[operation] += 1
        self.errors[f"{operation} {type(exception).__name__}"] += 1

    def snapshot(self) -> dict:
        return {"requests": dict(self.requests), "errors": dict(self.errors),
                "retries": self.retries, "direct_fallbacks": dict(self.fallbacks),
                "stale_connections_replaced": self.direct["stale_replaced"]}


def log_requests(events, stats: RequestStats | None = None) -> None:
    """At debug level, one line per S3 request (after botocore's retries): operation, key,
    range or part, HTTP status and milliseconds until the response (a GET's body is read
    after). The line is built from the API parameters and the status alone, never from the
    signed request, so no access key, token, signature or presigned URL reaches the log.
    Off debug, the one cost is a level check per request."""
    events.register("before-parameter-build.s3", _request_started)
    events.register("after-call.s3", functools.partial(_request_done, stats))
    events.register("after-call-error.s3", functools.partial(_request_failed, stats))


def _request_started(params, model, context, **_) -> None:
    key = params.get("Key", params.get("Prefix", ""))
    context["s3stream_operation"] = (model.name, key)
    if not log.isEnabledFor(logging.DEBUG):
        return
    text = f"{model.name} s3://{params.get('Bucket', '')}/{key}"
    source = params.get("CopySource")
    if isinstance(source, dict):
        text += f" from {source.get('Key', '')}"
    for name in ("Range", "CopySourceRange", "PartNumber"):
        if name in params:
            text += f" {name}={params[name]}"
    context["s3stream_request"] = (text, time.monotonic())
    body = params.get("Body")  # bytes, or a BytesIO botocore made of them
    if isinstance(body, bytes | bytearray | memoryview):
        context["s3stream_sent"] = len(body)  # scripts/bench sums these
    elif hasattr(body, "seek") and hasattr(body, "tell"):
        position = body.tell()
        context["s3stream_sent"] = body.seek(0, 2) - position
        body.seek(position)


def _request_done(stats: RequestStats | None, http_response, parsed, context, **_) -> None:
    retries = parsed.get("ResponseMetadata", {}).get("RetryAttempts", 0)
    if retries and context.get("s3_redirect", {}).get("redirected"):
        retries -= 1  # botocore's one region redirect (the answer named the bucket's
        # region, `_region_answer`): the request sent where the bucket is, not a failure
        # sent again
    if stats is not None and "s3stream_operation" in context:
        operation, key = context["s3stream_operation"]
        stats.done(operation, key, http_response.status_code,
                   str(parsed.get("Error", {}).get("Code", "")), retries)
    if "s3stream_request" in context:
        text, started = context.pop("s3stream_request")
        sent = context.pop("s3stream_sent", None)
        log.debug("S3 %s -> %s in %.1f ms%s%s", text, http_response.status_code,
                  (time.monotonic() - started) * 1000,
                  f" after {retries} retries" if retries else "",
                  f", {sent} bytes sent" if sent is not None else "")


def _request_failed(stats: RequestStats | None, exception, context, **_) -> None:
    if stats is not None and "s3stream_operation" in context:
        stats.failed(context["s3stream_operation"][0], exception)
    if "s3stream_request" in context:
        text, started = context.pop("s3stream_request")
        log.debug("S3 %s -> no response (%s) in %.1f ms", text, type(exception).__name__,
                  (time.monotonic() - started) * 1000)


def _pay_as_requester(request, **_) -> None:
    """botocore's before-sign hook with requester_pays: the header, signed."""
    if "x-amz-request-payer" not in request.headers:  # HTTPHeaders: setting appends
        request.headers["x-amz-request-payer"] = "requester"


def moved_to(region: str, response: direct_requests.Response) -> str | None:
    """The bucket's region when a direct request signed for `region` was answered that the
    bucket is elsewhere, else None."""
    told = response.headers.get("x-amz-bucket-region")
    if not told and response.status == 400:
        found = _BODY_REGION.search(response.body)
        told = found and found.group(1).decode()
    if response.status in REGION_REDIRECTS and told and told != region:
        return told
    return None


def retry_delay(retry: int) -> float:
    return RETRY_DELAYS[retry] if retry < len(RETRY_DELAYS) else RETRY_DELAY_MAX


class BotocoreStore:
    """ObjectStore over one botocore S3 client.

    A bucket in another region than the client's: the first answer that says so (botocore's
    needs-retry hook sees every answer, the direct requests look at theirs; at mount that is
    HeadBucket's) moves the mount there for good (`_follow_region`): a new botocore client
    and direct client for that region, signed for it, and sent to its regional endpoint
    unless the endpoint is a custom one. botocore redirects the one request itself."""

    # the bucket's region as an answer named it: set by botocore's hook in a worker thread
    # (one assignment), followed on the trio side by `_follow_region`
    _region_told: str | None = None

    def __init__(self, config: StoreConfig):
        self.config = config
        self.bucket = config.bucket
        self._session = botocore.session.Session(profile=config.profile)
        self._session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=parse_timestamp)
        self.region: str = config.region or self._session.get_config_variable("region") or \
            "us-east-1"
        self._client_config = botocore.config.Config(
            max_pool_connections=config.max_connections,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            retries={"mode": "standard", "total_max_attempts": config.max_attempts},
            s3={"addressing_style": "path" if config.force_path_style else "auto",
                "payload_signing_enabled": payload_signing(config)},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            client_cert=(config.client_cert, config.client_key) if config.client_key
            else config.client_cert,
        )
        self.stats = RequestStats()
        self._client = self._make_client(self.region)
        self.limiter = trio.CapacityLimiter(config.max_connections)
        self._credentials = self._session.get_credentials()
        self._direct = self._direct_client() if config.direct_requests else None
        self._direct_frozen: tuple[float, direct_requests.Credentials] | None = None
        # per kind of request (HeadObject, PutObject, ListObjectsV2 ...): a server that
        # answers one kind oddly (a chunked LIST) keeps the direct way for the others
        self._direct_misses: collections.Counter[str] = collections.Counter()
        self._direct_paused_until: dict[str, float] = {}

    def _make_client(self, region: str):
        """A botocore client for `region` with the mount's hooks (the session keeps the
        credentials it resolved first: a second client does not look them up again)."""
        client = self._session.create_client(
            "s3", region_name=region, endpoint_url=self.config.endpoint_url,
            config=self._client_config)
        log_requests(client.meta.events, self.stats)
        client.meta.events.register("needs-retry.s3", self._region_answer)
        if self.config.requester_pays:
            client.meta.events.register("before-sign.s3", _pay_as_requester)
        return client

    def _region_answer(self, response, operation, **_) -> None:
        """botocore's needs-retry hook, in a worker thread, on every answer: a wrong-region
        answer (or HeadBucket's, whatever its status) names the bucket's region."""
        if response is None:
            return
        told = response[0].headers.get("x-amz-bucket-region") or \
            response[1].get("Error", {}).get("Region")
        if told and told != self.region and (
                response[0].status_code in REGION_REDIRECTS or operation.name == "HeadBucket"):
            self._region_told = told

    async def _follow_region(self, region: str | None = None) -> None:
        """Send every later request to the bucket's region (`region`, or the one botocore's
        hook saw): one log line, a new botocore client and direct client. The clients are
        swapped before the one await (closing the old direct client's idle connections):
        a request already on its way finishes on the old ones, and if it is answered with
        the same redirect, this finds the region already followed and changes nothing."""
        region = region or self._region_told
        self._region_told = None
        if not region or region == self.region:
            return
        if not REGION_NAME.fullmatch(region):
            log.debug("answer names region %r: not a region name, ignored", region)
            return
        if self.config.region:
            log.warning("bucket %s is in region %s, not %s (option region): requests go to "
                        "%s; give -o region=%s to save a redirected request at mount",
                        self.bucket, region, self.region, region, region)
        else:
            log.info("bucket %s is in region %s, not %s: requests go there from now on "
                     "(-o region=%s saves a redirected request at mount)", self.bucket,
                     region, self.region, region)
        self.region = region
        self._client = self._make_client(region)
        old = self._direct
        if old is not None:
            self._direct = self._direct_client(old)
            await old.aclose()

    # -- requests sent directly (direct_requests.py), botocore when they get no answer ----

    def _direct_client(self, before: direct_requests.DirectClient | None = None
                       ) -> direct_requests.DirectClient | None:
        """A client for the bucket's URL as botocore addresses it, or None where botocore's
        handling is needed for every request: no credentials, or a proxy in between.
        Its counters are the mount's (`stats.direct`), whichever region it is for; from
        the client `before` it (a region followed) it keeps what it learned of the server
        (no pipelining) when both go to the same host (a custom endpoint)."""
        if self._credentials is None:
            return None
        probe = "s3stream-probe"
        url = self._bucket_url(probe)
        if url is None:
            return None
        try:
            context = self._tls_like_botocore(url)
        except (AttributeError, OSError, ValueError) as exc:  # another botocore, a bad file
            log.info("requests go through botocore alone: its TLS and proxy settings could "
                     "not be read for the mount's own connections (%s)", exc)
            return None
        if context is False:
            return None
        try:
            client = direct_requests.DirectClient(
                url, probe, self._client.meta.region_name, self.config.connect_timeout,
                self.config.read_timeout, context, max_connections=64,
                headers={"x-amz-request-payer": "requester"} if self.config.requester_pays
                else None, counters=self.stats.direct)
        except ValueError:
            return None
        if before is not None and (before.host, before.port) == (client.host, client.port):
            client.pipelining = before.pipelining
        return client

    def _bucket_url(self, probe: str) -> str | None:
        """The URL of object `probe` as the client's own requests address it: botocore's
        endpoint rules (what its region redirect uses too) give the regional host; a
        presigned URL, the fallback, names the global one (s3.amazonaws.com) in any region."""
        try:
            operation = self._client.meta.service_model.operation_model("HeadObject")
            endpoint = self._client._ruleset_resolver.construct_endpoint(
                operation_model=operation, call_args={"Bucket": self.bucket, "Key": probe},
                request_context={})
            return f"{endpoint.url.rstrip('/')}/{direct_requests.quote_key(probe)}"
        except Exception as exc:  # another botocore
            log.debug("endpoint rules not usable (%r): the bucket's URL from a presigned one",
                      exc)
        try:
            url = self._client.generate_presigned_url(
                "head_object", Params={"Bucket": self.bucket, "Key": probe}, ExpiresIn=60)
        except Exception:  # no credentials after all, or an odd endpoint
            return None
        return url.partition("?")[0]  # the signature is not ours to keep

    def _tls_like_botocore(self, url: str) -> ssl.SSLContext | None | bool:
        """The settings botocore's own HTTP session resolved for this client, so that both
        ways to the server agree: the CA bundle (verify: ca_bundle from the config file or
        AWS_CA_BUNDLE, REQUESTS_CA_BUNDLE, else botocore's default bundle), the client
        certificate (client_cert), and the proxy (Config proxies, else the environment's
        HTTP(S)_PROXY with NO_PROXY applied to the endpoint as botocore applies it). False:
        a proxy is in between (the direct way stays off); None: plain http."""
        http = self._client._endpoint.http_session
        if http._proxy_config.proxy_url_for(url):
            return False
        if urllib.parse.urlsplit(url).scheme != "https":
            return None
        verify = http._verify
        if verify is False:  # botocore does not check the certificate: neither do we
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = ssl.create_default_context(
                cafile=botocore.httpsession.get_cert_path(verify))
        if http._cert_file:
            context.load_cert_chain(http._cert_file, keyfile=http._key_file)
        return context

    async def _direct_credentials(self) -> direct_requests.Credentials:
        """A frozen copy of the credentials, refreshed every CREDENTIALS_REFRESH seconds;
        raises Unanswered when they cannot be had (botocore then says why)."""
        now = time.monotonic()
        if self._direct_frozen is None or self._direct_frozen[0] < now:
            # a refresh may block on the network: a worker thread does it
            try:
                frozen = await trio.to_thread.run_sync(
                    self._credentials.get_frozen_credentials)
            except Exception as exc:  # an expired session, no instance metadata ...
                raise direct_requests.Unanswered(f"no credentials: {type(exc).__name__}") \
                    from None
            self._direct_frozen = (now + CREDENTIALS_REFRESH, direct_requests.Credentials(
                frozen.access_key, frozen.secret_key, frozen.token))
        return self._direct_frozen[1]

    async def _send_direct(self, operation: str, method: str, key: str,
                           expected: tuple[int, ...], headers: dict[str, str] | None = None,
                           body: bytes = b"", payload_hash: str = direct_requests.EMPTY_SHA256,
                           query: dict[str, str] | None = None
                           ) -> direct_requests.Response | None:
        """The answer when it is one of `expected`; raises the error botocore would raise
        for a final 4xx with S3's XML error (AccessDenied ...: sent once, not twice); else
        None: send it through botocore. After DIRECT_MISSES misses in a row, botocore alone
        for DIRECT_PAUSE seconds. An answer that the bucket is in another region moves the
        mount there (`_follow_region`) and the request is sent again, directly, once."""
        if self._region_told:
            await self._follow_region()
        started = time.monotonic()
        shown = key or (query or {}).get("prefix", "")  # what the log line names
        if query and "partNumber" in query:  # as botocore's line names a part
            shown += f" PartNumber={query['partNumber']}"
        for attempt in range(2):
            if not self._direct_usable(operation):
                return None
            client = self._direct  # the region it signs for may be followed meanwhile
            try:
                response = await client.request(
                    method, key, await self._direct_credentials(), headers, body,
                    payload_hash, query)
            except direct_requests.Unanswered as exc:
                log.debug("S3 %s s3://%s/%s -> no answer (%s) in %.1f ms, again through "
                          "botocore", operation, self.bucket, shown, exc,
                          (time.monotonic() - started) * 1000)
                self._direct_missed(operation)
                return None
            region = moved_to(client.signer.region, response)
            if region is None or attempt:
                break
            await self._follow_region(region)
        if response.status not in expected:
            error = parse_error_answer(response.status, response.headers, response.body)
            took = (time.monotonic() - started) * 1000
            if error is not None:
                # S3's final word (AccessDenied, NoSuchBucket ...): an answer, not a miss;
                # botocore would get the same and raise the same
                self._direct_misses[operation] = 0
                self.stats.done(operation, shown, response.status, error[0], 0)
                log.debug("S3 %s s3://%s/%s -> %s %s in %.1f ms", operation, self.bucket,
                          shown, response.status, error[0], took)
                raise _client_error(error[0], response.status, error[1],
                                    self._where(operation, shown))
            log.debug("S3 %s s3://%s/%s -> %s in %.1f ms, again through botocore",
                      operation, self.bucket, shown, response.status, took)
            self._direct_missed(operation)
            return None
        self._direct_misses[operation] = 0
        self.stats.done(operation, shown, response.status, "", 0)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("S3 %s s3://%s/%s -> %s in %.1f ms%s", operation, self.bucket, shown,
                      response.status, (time.monotonic() - started) * 1000,
                      f", {len(body)} bytes sent" if method == "PUT" else "")
        return response

    def _direct_usable(self, operation: str) -> bool:
        return self._direct is not None and \
            time.monotonic() >= self._direct_paused_until.get(operation, 0.0)

    def _direct_missed(self, operation: str) -> None:
        """A direct request went to botocore after all (counted for `s3stream status`)."""
        self.stats.fallbacks[operation] += 1
        self._direct_misses[operation] += 1
        if self._direct_misses[operation] >= DIRECT_MISSES:
            self._direct_misses[operation] = 0
            self._direct_paused_until[operation] = time.monotonic() + DIRECT_PAUSE
            log.info("S3 %s requests over the mount's own connections got no plain answer "
                     "%d times in a row; botocore sends them for the next %.0f s", operation,
                     DIRECT_MISSES, DIRECT_PAUSE)

    async def aclose(self) -> None:
        if self._direct is not None:
            await self._direct.aclose()

    async def _call(self, what: str, fn, /, **kwargs):
        def run():
            try:
                return fn(**kwargs)
            except Exception as exc:  # translated here, in the worker thread
                raise _translate(exc, what) from None

        return await self._retrying(what, run)

    async def _retrying(self, what: str, run, retry_time: float | None = None):
        """`run()` in a worker thread; while it fails transiently, again after a pause, until
        `retry_time` (default: the config's) seconds have passed since the first attempt."""
        budget = self.config.retry_time if retry_time is None else retry_time
        started = trio.current_time()
        retry = 0
        while True:
            try:
                result = await trio.to_thread.run_sync(run, limiter=self.limiter)
            except FsError as exc:
                if self._region_told:
                    await self._follow_region()
                left = started + budget - trio.current_time()
                if not transient(exc) or left <= 0:
                    if retry:
                        log.warning("%s: gave up after %.0f s of retries", what,
                                    trio.current_time() - started)
                    raise
                if not retry:
                    log.warning("%s: %s; retrying for up to %.0f s", what,
                                exc.message.removeprefix(what + ": "), left)
                await trio.sleep(min(retry_delay(retry), left))
                retry += 1
                continue
            if retry:
                log.warning("%s: succeeded after %.1f s of retries", what,
                            trio.current_time() - started)
            if self._region_told:
                await self._follow_region()
            return result

    def _where(self, op: str, key: str = "") -> str:
        return f"{op} s3://{self.bucket}/{key}"

    def _put_args(self, options: PutOptions) -> dict:
        """A new object's (or new metadata's) parameters: metadata, content type, an
        existing object's own content headers, the storage options, its tags."""
        args: dict = {"Metadata": dict(options.metadata)}
        if options.content_type:
            args["ContentType"] = options.content_type
        if options.headers is not None:
            args |= {arg: value for arg, value in _kept_args(options.headers).items()
                     if arg not in _STORAGE_ARGS}
        if options.tags:
            args["Tagging"] = options.tags
        return args | self._storage_args(options.headers, options.temporary)

    def _storage_args(self, headers: dict[str, str] | None = None,
                      temporary: bool = False) -> dict:
        """Storage class, encryption and ACL of an object written, copies included: S3 does
        not carry them over in a CopyObject (it applies the bucket's defaults), even when
        the metadata is copied. A new object gets the mount's options; an existing one
        rewritten (`headers`: its own, from its HEAD) keeps its class and encryption. The
        ACL is always the mount's: a HEAD does not show an object's grants.

        A temporary object (a spilled part, read back within minutes) is STANDARD: GLACIER
        could not be read back, STANDARD_IA and GLACIER_IR bill every object 30-90 days. It
        keeps the encryption, and only an ACL that grants nobody beyond the bucket owner
        (a bucket policy may demand bucket-owner-full-control): public-read would publish
        the bytes of files still being written."""
        if headers is not None:
            args = {arg: value for arg, value in _kept_args(headers).items()
                    if arg in _STORAGE_ARGS}
        else:
            args = {}
            if self.config.storage_class and not temporary:
                args["StorageClass"] = self.config.storage_class
            if self.config.sse:
                args["ServerSideEncryption"] = self.config.sse
                if self.config.sse_kms_key_id:
                    args["SSEKMSKeyId"] = self.config.sse_kms_key_id
        if self.config.acl and (not temporary or self.config.acl in OWNER_ONLY_ACLS):
            args["ACL"] = self.config.acl
        return args

    def _checksum_args(self, data) -> dict:
        if self.config.checksum == "crc32":
            return {"ChecksumCRC32": crc32_base64(data)}
        if self.config.checksum == "md5":
            return {"ContentMD5": md5_base64(data)}
        return {}

    def _verify(self, what: str, sent: dict, response: dict) -> None:
        expected = sent.get("ChecksumCRC32")
        returned = response.get("ChecksumCRC32")
        if expected and returned and expected != returned:
            raise IntegrityError(f"{what}: server stored CRC32 {returned}, we sent {expected}")

    # -- reads -------------------------------------------------------------------------

    async def check_bucket(self) -> None:
        """Before mounting: one answer, quickly (no retries beyond botocore's)."""
        what = self._where("HeadBucket")

        def run():
            try:
                return self._client.head_bucket(Bucket=self.bucket)
            except Exception as exc:
                raise _translate(exc, what) from None

        await self._retrying(what, run, retry_time=0)

    async def head(self, key: str) -> ObjectInfo:
        response = await self._send_direct("HeadObject", "HEAD", key, (200, 404))
        found = self._head_answer(key, response) if response is not None else None
        if isinstance(found, FsError):
            raise found
        if found is not None:
            return found
        r = await self._call(self._where("HeadObject", key), self._client.head_object,
                             Bucket=self.bucket, Key=key)
        headers = r.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        kept, tag_count = kept_headers(headers)
        return ObjectInfo(key=key, size=r["ContentLength"], etag=r.get("ETag", ""),
                          last_modified=r["LastModified"].timestamp(),
                          metadata={k.lower(): v for k, v in r.get("Metadata", {}).items()},
                          content_type=r.get("ContentType"), headers=kept,
                          tag_count=tag_count, answered=_answered(headers))

    async def head_many(self, keys: list[str]) -> list[ObjectInfo | FsError]:
        """HEADs of many keys, pipelined on one connection (`DirectClient.head_many`); each
        key's ObjectInfo, or the error its HEAD ended with (NotFound, ...). Keys left
        without an answer there are asked one by one."""
        found: list[ObjectInfo | FsError | None] = [None] * len(keys)
        if self._region_told:
            await self._follow_region()
        if self._direct_usable("HeadObject"):
            started = time.monotonic()
            responses = await self._head_many_direct(keys)
            took = (time.monotonic() - started) * 1000
            for index, (key, response) in enumerate(zip(keys, responses, strict=True)):
                if response is not None and response.status in (200, 404):
                    found[index] = self._head_answer(key, response)
                if found[index] is not None:
                    self.stats.done("HeadObject", key, response.status, "", 0)
                    log.debug("S3 HeadObject s3://%s/%s -> %s in %.1f ms (%d pipelined)",
                              self.bucket, key, response.status, took, len(keys))
            if all(f is None for f in found):
                self._direct_missed("HeadObject")
            else:
                self._direct_misses["HeadObject"] = 0
        for index, key in enumerate(keys):
            if found[index] is None:
                try:
                    found[index] = await self.head(key)
                except FsError as exc:
                    found[index] = exc
        return found  # type: ignore[return-value]

    async def _head_many_direct(self, keys: list[str]) -> list[direct_requests.Response | None]:
        """`DirectClient.head_many`; once more in the bucket's region if an answer names
        another one than the client signed for."""
        responses: list[direct_requests.Response | None] = [None] * len(keys)
        for attempt in range(2):
            client = self._direct  # the region it signs for may be followed meanwhile
            if client is None:
                break
            try:
                responses = await client.head_many(keys, await self._direct_credentials())
            except direct_requests.Unanswered:
                break
            region = next((moved for r in responses if r is not None
                           if (moved := moved_to(client.signer.region, r))), None)
            if region is None or attempt:
                break
            await self._follow_region(region)
        return responses

    def _head_answer(self, key: str, response: direct_requests.Response
                     ) -> ObjectInfo | FsError | None:
        """A direct HEAD's answer: the object, NotFound, or None if it is not understood."""
        if response.status == 404:
            return NotFound(f"{self._where('HeadObject', key)}: 404: Not Found")
        if response.status != 200:
            return None
        headers = response.headers
        kept, tag_count = kept_headers(headers)
        try:
            return ObjectInfo(
                key=key, size=int(headers["content-length"]), etag=headers.get("etag", ""),
                last_modified=parse_timestamp(headers["last-modified"]).timestamp(),
                metadata={name[11:]: value for name, value in headers.items()
                          if name.startswith("x-amz-meta-")},
                content_type=headers.get("content-type"), headers=kept, tag_count=tag_count,
                answered=_answered(headers))
        except (KeyError, ValueError, TypeError):
            return None  # an answer botocore may understand better

    async def get_range(self, key: str, start: int, end: int, etag: str | None,
                        into: bytearray | None = None) -> bytes | memoryview:
        what = self._where("GetObject", key)
        length = end - start

        def fetch() -> bytes | memoryview:
            args = {"Bucket": self.bucket, "Key": key, "Range": f"bytes={start}-{end - 1}"}
            if etag:
                args["IfMatch"] = etag
            for attempt in range(3):
                try:
                    r = self._client.get_object(**args)
                    body = r["Body"]
                    try:
                        sent = r.get("ContentLength")
                        if sent is not None and sent != length:
                            data = None  # never read a body we did not ask for
                        elif into is None:
                            data = body.read()
                            got = len(data)
                        else:
                            data = memoryview(into)[:length]
                            got = _read_body_into(body, data)
                    finally:
                        body.close()
                except Exception as exc:
                    if isinstance(exc, (OSError, http.client.HTTPException)) and \
                            not isinstance(exc, botocore.exceptions.BotoCoreError):
                        # raised by _read_body_into below botocore: a body cut off
                        translated = Unreachable(f"{what}: connection lost mid-body: {exc!r}")
                    else:
                        translated = _translate(exc, what)
                    # a body cut off mid-read surfaces here as a connection error: retry it
                    if isinstance(translated, Unreachable) and attempt < 2:
                        continue
                    raise translated from None
                if data is None:
                    raise IntegrityError(f"{what}: asked for bytes {start}-{end - 1} ({length}) "
                                         f"and the server sent {sent}: it does not honour "
                                         "Range requests")
                if got == length:
                    return data
                log.warning("%s: short body (%d of %d bytes), retrying", what, got, length)
            raise IntegrityError(f"{what}: server kept returning short bodies for "
                                 f"bytes {start}-{end - 1}")

        return await self._retrying(what, fetch)

    async def list_page(self, prefix: str, delimiter: str | None = "/",
                        token: str | None = None, max_keys: int = 1000,
                        start_after: str | None = None) -> ListPage:
        page = await self._list_direct(prefix, delimiter, token, max_keys, start_after)
        if page is not None:
            return page
        args = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": max_keys}
        if delimiter:
            args["Delimiter"] = delimiter
        if start_after:
            args["StartAfter"] = start_after
        if token:
            args["ContinuationToken"] = token
        r = await self._call(self._where("ListObjectsV2", prefix), self._client.list_objects_v2,
                             **args)
        objects = [ObjectInfo(key=o["Key"], size=o["Size"], etag=o.get("ETag", ""),
                              last_modified=o["LastModified"].timestamp(), has_metadata=False)
                   for o in r.get("Contents", [])]
        prefixes = [p["Prefix"] for p in r.get("CommonPrefixes", [])]
        next_token = r.get("NextContinuationToken") if r.get("IsTruncated") else None
        return ListPage(objects, prefixes, next_token)

    async def _list_direct(self, prefix: str, delimiter: str | None, token: str | None,
                           max_keys: int, start_after: str | None = None) -> ListPage | None:
        """ListObjectsV2 parsed here (ElementTree): botocore's parser costs ~40 ms of CPU
        per 1,000 keys. Keys come URL-encoded (any byte survives XML), as botocore asks."""
        query = {"list-type": "2", "prefix": prefix, "max-keys": str(max_keys),
                 "encoding-type": "url"}
        if delimiter:
            query["delimiter"] = delimiter
        if token:
            query["continuation-token"] = token
        if start_after:
            query["start-after"] = start_after
        response = await self._send_direct("ListObjectsV2", "GET", "", (200,), query=query)
        if response is None:
            return None
        try:
            return parse_list_page(response.body)
        except (ElementTree.ParseError, TypeError, ValueError) as exc:
            log.debug("ListObjectsV2 %s: answer not understood (%s), again through botocore",
                      prefix, exc)
            return None

    # -- writes ------------------------------------------------------------------------

    async def _send_checked(self, what: str, fn, body, **kwargs) -> dict:
        """Send `body` with its checksum and check the server's echo, all in the worker
        thread: hashing 8 MiB takes milliseconds the event loop should not wait for.
        Bytes and bytearrays go as they are; botocore takes no other buffers."""
        if not isinstance(body, bytes | bytearray):
            body = bytes(body)

        def send(**kwargs):
            checks = self._checksum_args(body)
            r = fn(Body=body, **checks, **kwargs)
            self._verify(what, checks, r)
            return r

        return await self._call(what, send, **kwargs)

    async def put(self, key: str, data, options: PutOptions) -> str:
        if len(data) <= DIRECT_PUT_MAX and self._direct is not None:
            etag = await self._put_direct(key, bytes(data), options)
            if etag is not None:
                return etag
        r = await self._send_checked(self._where("PutObject", key), self._client.put_object,
                                     data, Bucket=self.bucket, Key=key,
                                     **self._put_args(options))
        return r.get("ETag", "")

    def _object_headers(self, options: PutOptions) -> dict[str, str]:
        """A new object's parameters (`_put_args`) as the headers of a direct request."""
        headers = {f"x-amz-meta-{name}": value for name, value in options.metadata.items()}
        return headers | _arg_headers(self._put_args(options))

    async def _put_direct(self, key: str, body: bytes, options: PutOptions) -> str | None:
        headers = self._object_headers(options)
        checks = self._checksum_args(body)
        if "ChecksumCRC32" in checks:
            headers["x-amz-checksum-crc32"] = checks["ChecksumCRC32"]
        if "ContentMD5" in checks:
            headers["content-md5"] = checks["ContentMD5"]
        payload = hashlib.sha256(body).hexdigest() if payload_signing(self.config) \
            else direct_requests.UNSIGNED
        response = await self._send_direct("PutObject", "PUT", key, (200,), headers, body,
                                           payload)
        if response is None:
            return None
        self._verify(self._where("PutObject", key), checks,
                     {"ChecksumCRC32": response.headers.get("x-amz-checksum-crc32")})
        return response.headers.get("etag", "")

    async def create_upload(self, key: str, options: PutOptions) -> str:
        # No ChecksumAlgorithm here: each part still carries x-amz-checksum-crc32 (verified by
        # the server and checked against its echo), but completion then needs no per-part
        # checksums, which ListParts does not return everywhere (SeaweedFS) -- so `recover`
        # can complete an upload from its listed parts alone.
        if self._direct_parts():
            response = await self._send_direct("CreateMultipartUpload", "POST", key, (200,),
                                               self._object_headers(options), b"",
                                               query={"uploads": ""})
            upload_id = _xml_field(response, "InitiateMultipartUploadResult", "UploadId")
            if upload_id:
                return upload_id
        args = self._put_args(options)
        r = await self._call(self._where("CreateMultipartUpload", key),
                             self._client.create_multipart_upload,
                             Bucket=self.bucket, Key=key, **args)
        return r["UploadId"]

    async def upload_part(self, key: str, upload_id: str, number: int, data) -> UploadedPart:
        etag = await self._upload_part_direct(key, upload_id, number, data)
        if etag is not None:
            return UploadedPart(number, etag, len(data))
        r = await self._send_checked(self._where(f"UploadPart {number}", key),
                                     self._client.upload_part, data, Bucket=self.bucket,
                                     Key=key, UploadId=upload_id, PartNumber=number)
        return UploadedPart(number, r["ETag"], len(data))

    def _direct_parts(self) -> bool:
        """Multipart requests (create, parts, complete) go over the mount's own connections
        only over plain http: under TLS the event-loop thread would encrypt each part (and
        hold its ciphertext), which botocore does in worker threads."""
        return self._direct is not None and not self._direct.https

    async def _upload_part_direct(self, key: str, upload_id: str, number: int,
                                  data) -> str | None:
        """A part over the mount's own connections (its ETag), or None: through botocore.

        botocore spends ~1.7 ms of CPU (holding the GIL) on each UploadPart whatever its
        size, 0.2 s per GiB written with 8 MiB parts (`_direct_parts`). The checksum is
        computed in a worker thread (the GIL is let go for large buffers), then the part is
        sent straight from its buffer."""
        if not self._direct_parts() or not self._direct_usable("UploadPart"):
            return None
        body = data if isinstance(data, bytes | bytearray) else bytes(data)

        def checksum() -> tuple[dict, str]:
            signed = payload_signing(self.config)
            return (self._checksum_args(body),
                    hashlib.sha256(body).hexdigest() if signed else direct_requests.UNSIGNED)

        checks, payload = await trio.to_thread.run_sync(checksum)
        headers = {}
        if "ChecksumCRC32" in checks:
            headers["x-amz-checksum-crc32"] = checks["ChecksumCRC32"]
        if "ContentMD5" in checks:
            headers["content-md5"] = checks["ContentMD5"]
        # the part stays unchanged across these awaits: the writer marks it busy until the
        # upload returns (writer.py `_start_upload`)
        response = await self._send_direct(
            "UploadPart", "PUT", key, (200,), headers, body, payload,
            query={"partNumber": str(number), "uploadId": upload_id})
        if response is None or not response.headers.get("etag"):
            return None
        self._verify(self._where(f"UploadPart {number}", key), checks,
                     {"ChecksumCRC32": response.headers.get("x-amz-checksum-crc32")})
        return response.headers["etag"]

    async def upload_part_copy(self, key: str, upload_id: str, number: int, source_key: str,
                               start: int, end: int, source_etag: str | None) -> UploadedPart:
        args = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": number,
                "CopySource": {"Bucket": self.bucket, "Key": source_key},
                "CopySourceRange": f"bytes={start}-{end - 1}"}
        if source_etag:
            args["CopySourceIfMatch"] = source_etag
        r = await self._call(self._where(f"UploadPartCopy {number}", key),
                             self._client.upload_part_copy, **args)
        result = r.get("CopyPartResult", {})
        return UploadedPart(number, result.get("ETag", ""), end - start)

    async def complete(self, key: str, upload_id: str, parts: list[UploadedPart]) -> str:
        listed = []
        for part in sorted(parts, key=lambda p: p.number):
            listed.append({"PartNumber": part.number, "ETag": part.etag})
        if self._direct_parts():
            # S3 may answer 200 and an <Error> in the body: anything but a result naming the
            # object's ETag goes again through botocore, which knows those answers
            body = _complete_body(listed)  # small: signed (SHA-256), as botocore signs it
            response = await self._send_direct(
                "CompleteMultipartUpload", "POST", key, (200,), {}, body,
                hashlib.sha256(body).hexdigest(), query={"uploadId": upload_id})
            etag = _xml_field(response, "CompleteMultipartUploadResult", "ETag")
            if etag:
                return etag
        r = await self._call(self._where("CompleteMultipartUpload", key),
                             self._client.complete_multipart_upload, Bucket=self.bucket,
                             Key=key, UploadId=upload_id, MultipartUpload={"Parts": listed})
        return r.get("ETag", "")

    async def abort(self, key: str, upload_id: str) -> None:
        try:
            await self._call(self._where("AbortMultipartUpload", key),
                             self._client.abort_multipart_upload, Bucket=self.bucket, Key=key,
                             UploadId=upload_id)
        except NoSuchUpload:
            pass

    async def list_parts(self, key: str, upload_id: str) -> list[UploadedPart]:
        parts: list[UploadedPart] = []
        marker = 0
        while True:
            r = await self._call(self._where("ListParts", key), self._client.list_parts,
                                 Bucket=self.bucket, Key=key, UploadId=upload_id,
                                 PartNumberMarker=marker)
            parts += [UploadedPart(p["PartNumber"], p["ETag"], p["Size"],
                                   p["LastModified"].timestamp() if "LastModified" in p else 0.0)
                      for p in r.get("Parts", [])]
            if not r.get("IsTruncated"):
                return parts
            marker = r["NextPartNumberMarker"]

    async def list_uploads(self, prefix: str = "",
                           max_uploads: int | None = None) -> list[PendingUpload]:
        uploads: list[PendingUpload] = []
        args = {"Bucket": self.bucket, "Prefix": prefix}
        if max_uploads is not None:
            args["MaxUploads"] = max_uploads
        while True:
            r = await self._call(self._where("ListMultipartUploads", prefix),
                                 self._client.list_multipart_uploads, **args)
            uploads += [PendingUpload(u["Key"], u["UploadId"], u["Initiated"].timestamp())
                        for u in r.get("Uploads", [])]
            if not r.get("IsTruncated") or max_uploads is not None:
                return uploads
            args["KeyMarker"] = r["NextKeyMarker"]
            args["UploadIdMarker"] = r["NextUploadIdMarker"]

    async def copy(self, source_key: str, dest_key: str, options: PutOptions | None,
                   size: int, source_etag: str | None = None,
                   headers: dict[str, str] | None = None) -> str:
        if source_etag:
            source_etag = '"' + source_etag.strip('"') + '"'  # SeaweedFS answers unquoted
        if size > 5 * 1024**3:
            return await self._multipart_copy(source_key, dest_key, options, size,
                                              source_etag)
        if size <= DIRECT_COPY_MAX and self._direct is not None:
            etag = await self._copy_direct(source_key, dest_key, options, source_etag,
                                           headers)
            if etag is not None:
                return etag
        args = {"Bucket": self.bucket, "Key": dest_key,
                "CopySource": {"Bucket": self.bucket, "Key": source_key}}
        if source_etag:
            args["CopySourceIfMatch"] = source_etag
        if options is not None:
            # tags stay (TaggingDirective COPY, the default): x-amz-tagging is not sent
            put_args = self._put_args(options)
            put_args.pop("Tagging", None)
            args.update(put_args, MetadataDirective="REPLACE")
        else:
            args.update(self._storage_args(headers))
        r = await self._call(self._where("CopyObject", dest_key), self._client.copy_object,
                             **args)
        return r.get("CopyObjectResult", {}).get("ETag", "")

    async def _copy_direct(self, source_key: str, dest_key: str, options: PutOptions | None,
                           source_etag: str | None, headers: dict[str, str] | None
                           ) -> str | None:
        """`copy` over the mount's own connections, its ETag: a rename (rsync renames every
        file it writes) costs ~0.1 ms of CPU instead of botocore's ~1.7. None: botocore's
        to send, when the answer is not a CopyObjectResult (S3 may answer 200 with an
        <Error> in the body). The same headers as botocore's CopyObject."""
        request = {"x-amz-copy-source": urllib.parse.quote(f"{self.bucket}/{source_key}",
                                                           safe="/~")}
        if source_etag:
            request["x-amz-copy-source-if-match"] = source_etag
        if options is not None:
            request |= self._object_headers(options)
            request.pop("x-amz-tagging", None)  # tags stay (TaggingDirective COPY)
            request["x-amz-metadata-directive"] = "REPLACE"
        else:
            request |= _arg_headers(self._storage_args(headers))
        response = await self._send_direct("CopyObject", "PUT", dest_key, (200,), request)
        return _xml_field(response, "CopyObjectResult", "ETag", default="")

    async def _multipart_copy(self, source_key: str, dest_key: str,
                              options: PutOptions | None, size: int,
                              source_etag: str | None) -> str:
        """Copies over 5 GiB: UploadPartCopy of 512 MiB ranges, several in parallel. A new
        upload keeps nothing of the source by itself: its metadata (unless replaced),
        content headers, storage class, encryption and tags are sent from its HEAD."""
        head = await self.head(source_key)
        if options is None:
            options = PutOptions(head.metadata, head.content_type, head.headers)
        if options.tags is None and head.tag_count:
            options = dataclasses.replace(options, tags=await self.get_tags(source_key))
        upload_id = await self.create_upload(dest_key, options)
        step = 512 * 1024 * 1024
        ranges = [(i + 1, start, min(start + step, size))
                  for i, start in enumerate(range(0, size, step))]
        parts: list[UploadedPart] = []

        async def copy_one(number: int, start: int, end: int) -> None:
            parts.append(await self.upload_part_copy(
                dest_key, upload_id, number, source_key, start, end, source_etag))

        try:
            await run_parallel(functools.partial(copy_one, *r) for r in ranges)
            return await self.complete(dest_key, upload_id, parts)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.abort(dest_key, upload_id)
            raise

    async def get_tags(self, key: str) -> str:
        r = await self._call(self._where("GetObjectTagging", key),
                             self._client.get_object_tagging, Bucket=self.bucket, Key=key)
        return urllib.parse.urlencode([(t["Key"], t["Value"]) for t in r.get("TagSet", [])])

    async def delete(self, key: str) -> None:
        if await self._send_direct("DeleteObject", "DELETE", key, (200, 204)) is not None:
            return
        await self._call(self._where("DeleteObject", key), self._client.delete_object,
                         Bucket=self.bucket, Key=key)

