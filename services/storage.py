"""Output storage: S3-compatible object storage through boto3.

Objects go to the user's own bucket under deterministic keys, one prefix per attempt
(``outputs/{task_id}/{attempt}/{index}.{ext}``): one attempt never overwrites another's objects. Download
URLs are presigned GETs signed fresh on every read; nothing we hand out depends on an expiring copy.
Each upload carries the image's SHA-256 as its S3 checksum (the server verifies the body against it)
and in the object's metadata (``sha256``, hex).
botocore's errors are mapped to ``StorageUnavailable`` here and go no further: its message says what
failed in fixed words (it becomes a failed task's error, which clients see); botocore's text, which may
name the endpoint, goes to the log and the exception chain.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import boto3
import botocore.config
import botocore.exceptions

from services import metrics
from services.config import Config
from services.errors import StorageUnavailable
from services.images import ImageInfo

if TYPE_CHECKING:  # the stubs (boto3-stubs[s3]) are a test dependency only
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import LifecycleRuleTypeDef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    key: str
    mime_type: str
    bytes: int
    sha256: str
    width: int | None
    height: int | None


OUTPUTS_PREFIX = "outputs/"


def output_key(task_id: str, attempt: int, index: int, extension: str) -> str:
    """Where an attempt's output goes: one prefix per attempt, so that a stale worker's late upload
    never overwrites what another attempt stored, and its unused objects can be deleted."""
    return f"{OUTPUTS_PREFIX}{task_id}/{attempt}/{index}.{extension}"


class Storage:
    def __init__(self, config: Config, *, max_pool_connections: int = 50) -> None:
        self.bucket = config.s3_bucket
        self._expires = config.s3_presign_expires
        client_config = botocore.config.Config(
            region_name=config.s3_region,
            signature_version="s3v4",
            # The body's integrity is carried by the SHA-256 checksum we send (below), which the server
            # verifies; signing the payload too would hash every image a second time (over http).
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=max_pool_connections,
        )
        session = boto3.session.Session()

        def client(endpoint_url: str | None) -> S3Client:
            return session.client(
                "s3",
                endpoint_url=endpoint_url,
                aws_access_key_id=config.aws_access_key_id,
                aws_secret_access_key=config.aws_secret_access_key,
                config=client_config,
            )

        self._client = client(config.s3_endpoint_url)
        # Presigned URLs are signed for the address clients use, which may differ from ours (a
        # container network): S3_PUBLIC_ENDPOINT_URL. Signing is local; this client sends nothing.
        self._signer = (
            client(config.s3_public_endpoint_url) if config.s3_public_endpoint_url else self._client
        )

    def put_image(self, key: str, data: bytes, info: ImageInfo) -> StoredObject:
        digest = hashlib.sha256(data)
        hex_digest = digest.hexdigest()
        with _mapped_errors("upload"), metrics.storage_upload():
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=info.mime_type,
                Metadata={"sha256": hex_digest},
                ChecksumSHA256=base64.b64encode(digest.digest()).decode(),
            )
        return StoredObject(
            bucket=self.bucket,
            key=key,
            mime_type=info.mime_type,
            bytes=len(data),
            sha256=hex_digest,
            width=info.width,
            height=info.height,
        )

    def delete(self, keys: list[str]) -> None:
        """Delete objects (a missing one is no error)."""
        with _mapped_errors("delete"):
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True}
            )
        if response.get("Errors"):
            log.warning("storage could not delete: %s", response["Errors"])
            raise StorageUnavailable(f"storage could not delete {len(response['Errors'])} objects")

    def presigned_url(self, key: str) -> str:
        with _mapped_errors("presign"):
            return self._signer.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self._expires
            )

    def delete_task_objects(self, task_id: str) -> None:
        """Delete every object of a task, whatever attempt stored it (``outputs/{task}/``)."""
        prefix = f"{OUTPUTS_PREFIX}{task_id}/"
        with _mapped_errors("list"):
            listed = self._client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        keys = [item["Key"] for item in listed.get("Contents", [])]
        if keys:
            self.delete(keys)

    def expire_outputs(self, days: int) -> bool:
        """Set the bucket's lifecycle rule that expires outputs ``days`` after they were stored; False
        (logged) when the credentials may not (the bucket's own policy then decides)."""
        rule: LifecycleRuleTypeDef = {
            "ID": "imagegen-output-retention",
            "Filter": {"Prefix": OUTPUTS_PREFIX},
            "Status": "Enabled",
            "Expiration": {"Days": days},
        }
        try:
            with _mapped_errors("set the bucket's lifecycle"):
                self._client.put_bucket_lifecycle_configuration(
                    Bucket=self.bucket, LifecycleConfiguration={"Rules": [rule]}
                )
        except StorageUnavailable as exc:
            log.warning(
                "outputs are not expired by this service (%s): the bucket's own policy decides", exc.message
            )
            return False
        return True

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (a no-op when it does)."""
        with _mapped_errors("check the bucket"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                    raise
            self._client.create_bucket(Bucket=self.bucket)

    def ping(self) -> None:
        with _mapped_errors("reach the bucket"):
            self._client.head_bucket(Bucket=self.bucket)


@contextmanager
def _mapped_errors(action: str) -> Iterator[None]:
    try:
        yield
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        log.warning("storage could not %s: %s: %s", action, type(exc).__name__, exc)
        raise StorageUnavailable(f"storage could not {action} ({_kind(exc)})") from exc


def _kind(exc: Exception) -> str:
    """What went wrong, in words that name no host: the error's class, and S3's error code if any
    (``ClientError AccessDenied``)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code.isalnum() and len(code) <= 64:
            return f"{type(exc).__name__} {code}"
    return type(exc).__name__
