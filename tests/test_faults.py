"""Failures on the wire: a fault-injecting proxy between the mount and SeaweedFS (500,
SlowDown, resets, truncated bodies on a tenth of the requests), and a server that goes away
for a while (within the retry budget, and longer)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import random
import threading

import pytest
from conftest import new_bucket, run_with_timeout
from fault_proxy import ALL_MODES, FaultProxy

MiB = 1024 * 1024


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def proxy(seaweed):
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    with FaultProxy(port, rate=float(os.environ.get("FAULT_RATE", "0.10")), seed=int(os.environ.get("FAULT_SEED", "12")), modes=ALL_MODES) as proxy:
        yield proxy


def test_proxy_passes_ranges_conditions_and_signatures(seaweed, proxy):
    """Signed requests through the proxy (Host kept) are accepted; Range, If-Match and ETags
    pass untouched. No faults here: the proxy's rate is set to 0."""
    proxy.rate = 0.0
    bucket = new_bucket(seaweed)
    client = dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url).client()
    data = payload(3 * MiB, 1)
    etag = client.put_object(Bucket=bucket, Key="k", Body=data)["ETag"]
    got = client.get_object(Bucket=bucket, Key="k", Range="bytes=5-1048580", IfMatch=etag)
    assert got["ETag"] == etag and got["Body"].read() == data[5:1048581]
    with pytest.raises(client.exceptions.ClientError) as info:
        client.get_object(Bucket=bucket, Key="k", IfMatch='"0123"')
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert proxy.requests == 3 and not proxy.faults


def test_writers_and_readers_through_ten_percent_faults(seaweed, proxy, mount_factory):
    """8 writers (24 MiB in 1 MiB writes) and 4 readers of objects put beforehand, with 10 %
    of requests failing: every close() returns 0 and every byte is right."""
    bucket = new_bucket(seaweed)
    direct = seaweed.client()
    stored = {f"in/{i}.bin": payload(12 * MiB + i * 4099, 100 + i) for i in range(4)}
    for key, data in stored.items():
        direct.put_object(Bucket=bucket, Key=key, Body=data)
    through = dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url)
    m = mount_factory(through, bucket=bucket)
    (m.path / "out").mkdir()
    blocks = {i: payload(MiB, 200 + i) for i in range(8)}
    barrier = threading.Barrier(12)

    def write(i: int) -> str:
        barrier.wait()
        digest = hashlib.sha256()
        fd = os.open(m.path / f"out/{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for n in range(24):
                block = bytes([n]) + blocks[i][1:]
                os.write(fd, block)
                digest.update(block)
        finally:
            os.close(fd)  # raises on EIO
        return digest.hexdigest()

    def read(key: str) -> bytes:
        barrier.wait()
        with open(m.path / key, "rb") as f:
            return f.read()

    def run():
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            writers = {i: pool.submit(write, i) for i in range(8)}
            readers = {key: pool.submit(read, key) for key in stored}
            return ({i: f.result() for i, f in writers.items()},
                    {key: f.result() for key, f in readers.items()})

    digests, reads = run_with_timeout(run, 120, m.log)
    for key, data in stored.items():
        assert len(reads[key]) == len(data) and reads[key] == data, key
    for i, digest in digests.items():
        body = direct.get_object(Bucket=bucket, Key=f"out/{i}.bin")["Body"].read()
        assert len(body) == 24 * MiB and hashlib.sha256(body).hexdigest() == digest, i
    # a CreateMultipartUpload the server did but whose answer was lost leaves an empty
    # upload behind (the retry creates another): nothing else may be left
    for upload in m.uploads():
        assert f"CreateMultipartUpload s3://{bucket}/{upload['Key']} -> 200" in m.log()
        assert not direct.list_parts(Bucket=bucket, Key=upload["Key"],
                                     UploadId=upload["UploadId"]).get("Parts"), upload
    print(f"{proxy.requests} requests, faults: {dict(proxy.faults)}")
    assert sum(proxy.faults.values()) >= 0.05 * proxy.requests
    assert set(proxy.faults) == set(ALL_MODES), proxy.faults
