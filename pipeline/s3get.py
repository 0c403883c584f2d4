"""Whole-object S3 GETs at a fraction of the client CPU of s3fs or boto3: botocore signs, urllib3 sends.

At 23M images, client CPU per GET is core-hours (1 ms is 6.4 core-hours). Measured with bench/bench_s3_client.py
(moto on 127.0.0.1, 60 KB objects, 8 threads): s3fs's cat_file (fsspec's event loop, aiobotocore) ~2.0 ms of CPU per
GET, a boto3 client ~1.4-1.6 ms (its per-request event hooks, endpoint rules, parameter validation and response
parsing), pyarrow's C++ S3FileSystem ~0.9 ms (and it sends a HEAD before each GET), this client under the storage
layer's retry loop ~0.7 ms.

What each GET costs here: a SigV4 signature (botocore's S3SigV4Auth with the session's credentials, refreshed by
botocore when they are temporary) and one pooled urllib3 request. What is resolved once per bucket, by a real
botocore client: the object URL (addressing style, endpoint, region: whatever boto3 would use, from
AWS_ENDPOINT_URL, ~/.aws/config and the environment), by presigning a GET. A response in another region
(x-amz-bucket-region) moves that bucket to it and the GET is sent again, as botocore does.

No retries here: errors are raised as the storage layer classifies them (pipeline.storage.transient_kind: a
botocore ClientError carrying the HTTP status and S3 error code, urllib3's timeout and connection errors), and
pipeline.storage retries and counts them. A missing object or bucket is FileNotFoundError, a refused one
PermissionError. With an HTTP(S) proxy configured in the environment, `usable()` is False and the storage layer
keeps s3fs (which honours it).
"""

from __future__ import annotations

import os
import re
import threading
from urllib.parse import quote

# botocore's defaults: 60 s to connect, 60 s between bytes.
CONNECT_TIMEOUT_S = 60.0
READ_TIMEOUT_S = 60.0
_ERROR_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_ERROR_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")


def usable() -> bool:
    """False when an HTTP(S) proxy is configured (urllib3's pool does not read the environment's proxies)."""
    return not any(os.environ.get(v) for v in _PROXY_VARS)


class S3Getter:
    """GET whole objects; thread-safe (one per process: see pipeline.storage)."""

    def __init__(self, endpoint_url: str | None, max_connections: int):
        import botocore.session
        import urllib3
        from botocore.config import Config

        self._session = botocore.session.get_session()
        self._config = Config(signature_version="s3v4")
        self._endpoint_url = endpoint_url
        self._credentials = self._session.get_credentials()  # None: unsigned (public buckets)
        ca = self._session.get_config_variable("ca_bundle")
        if ca is None:
            from botocore.httpsession import get_cert_path

            ca = get_cert_path(True)
        self._http = urllib3.PoolManager(maxsize=max_connections, ca_certs=ca, retries=False,
                                         timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S))
        self._region = self._session.get_config_variable("region") or "us-east-1"
        self._buckets: dict[str, tuple[str, str]] = {}  # bucket -> (URL prefix of its keys, region)
        self._lock = threading.Lock()

    def _bucket(self, bucket: str, region: str | None = None) -> tuple[str, str]:
        with self._lock:
            known = self._buckets.get(bucket)
            if known is not None and (region is None or known[1] == region):
                return known
            region = region or self._region
            client = self._session.create_client("s3", region_name=region, endpoint_url=self._endpoint_url,
                                                 config=self._config)
            probe = "k"
            url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": probe},
                                                ExpiresIn=60).split("?", 1)[0]
            assert url.endswith("/" + probe), url
            self._buckets[bucket] = (url[: -len(probe)], region)
            return self._buckets[bucket]

    def get(self, bucket: str, key: str) -> bytes:
        """The object's bytes, in one GET (two when S3 says the bucket is in another region)."""
        prefix, region = self._bucket(bucket)
        response = self._send(prefix + quote(key, safe="/~"), region)
        moved = response.headers.get("x-amz-bucket-region")
        if response.status in (301, 307, 400) and moved and moved != region:
            prefix, region = self._bucket(bucket, moved)
            response = self._send(prefix + quote(key, safe="/~"), region)
        if response.status == 200:
            return response.data
        raise _error(response, bucket, key)

    def _send(self, url: str, region: str):
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method="GET", url=url)
        if self._credentials is not None:
            S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", region).add_auth(request)
        return self._http.request("GET", url, headers=dict(request.headers.items()), redirect=False,
                                  preload_content=True)


def _error(response, bucket: str, key: str) -> Exception:
    """The exception the storage layer classifies: FileNotFoundError, PermissionError, or a ClientError with the
    HTTP status and S3 error code (503 SlowDown: throttled; 5xx: server error; any other 4xx: permanent)."""
    from botocore.exceptions import ClientError

    body = response.data or b""
    code = _ERROR_CODE.search(body)
    message = _ERROR_MESSAGE.search(body)
    code = code.group(1).decode("utf-8", "replace") if code else str(response.status)
    message = message.group(1).decode("utf-8", "replace") if message else response.reason or ""
    where = f"s3://{bucket}/{key}"
    if response.status == 404:
        return FileNotFoundError(f"{where}: {code} ({message})")
    if response.status == 403:
        return PermissionError(f"{where}: {code} ({message})")
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": response.status}}, f"GetObject {where}")
