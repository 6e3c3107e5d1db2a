import pyarrow as pa
import pytest

from near_ray.storage import Storage, StorageError, join, relative


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("bucket") + "/root"


def test_roundtrip_list_exists(root):
    st = Storage()
    st.write_bytes(join(root, "a/1.png"), b"one")
    st.write_bytes(join(root, "a/b/2.jpg"), b"two!")
    st.write_bytes(join(root, "a/_hidden.png"), b"x")
    st.write_bytes(join(root, "a/.thumbs/3.png"), b"x")  # hidden folders: skipped on S3 as locally
    st.write_bytes(join(root, "_rejected/4.png"), b"x")
    st.write_text(join(root, "notes.txt"), "hello")
    assert st.read_bytes(join(root, "a/1.png")) == b"one"
    assert st.exists(join(root, "a/b/2.jpg"))
    assert st.exists(join(root, "a"))  # a folder/prefix with objects below it
    assert not st.exists(join(root, "a/missing.png"))
    objs = list(st.list(root, suffixes=[".png", ".jpg"]))
    assert sorted(relative(o.uri, root) for o in objs) == ["a/1.png", "a/b/2.jpg"]
    assert {o.size for o in objs} == {3, 4}
    assert all(o.etag for o in objs)


def test_json_and_parquet(root):
    st = Storage()
    st.write_json(join(root, "x.json"), {"a": [1, 2]})
    assert st.read_json(join(root, "x.json")) == {"a": [1, 2]}
    t = pa.table({"image_id": ["a", "b"], "n": [1, 2]})
    st.write_parquet(join(root, "t/part-0.parquet"), t)
    st.write_parquet(join(root, "t/part-1.parquet"), t)
    assert st.read_parquet(join(root, "t")).num_rows == 4
    assert st.read_parquet(join(root, "t/part-0.parquet")).equals(t)


def test_listing_streams_many_objects(bucket):
    """Listing pages through S3 lazily (a page is 1000 keys), never materializing everything first."""
    st = Storage()
    for i in range(1005):
        st.s3.put_object(Bucket=bucket[5:], Key=f"many/{i:05d}.png", Body=b"x")
    it = st.list(f"{bucket}/many")
    first = next(it)
    assert first.uri.endswith("00000.png")
    assert sum(1 for _ in it) == 1004


def test_atomic_local_write_leaves_no_partial(tmp_path, monkeypatch):
    st = Storage()
    target = tmp_path / "out.bin"
    st.write_bytes(str(target), b"old")

    class Boom(Exception):
        pass

    import os as _os

    real_replace = _os.replace

    def failing_replace(*a, **k):
        raise Boom()

    monkeypatch.setattr("near_ray.storage.os.replace", failing_replace)
    with pytest.raises(Boom):
        st.write_bytes(str(target), b"new")
    monkeypatch.setattr("near_ray.storage.os.replace", real_replace)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temp file left behind


def test_clear_errors(s3_endpoint, tmp_path, monkeypatch):
    st = Storage()
    with pytest.raises(StorageError, match="s3://no-such-bucket-xyz.*bucket does not exist"):
        list(st.list("s3://no-such-bucket-xyz/prefix"))
    with pytest.raises(StorageError, match="no such folder"):
        list(st.list(str(tmp_path / "nope")))
    with pytest.raises(StorageError, match="no such file"):
        st.read_bytes(str(tmp_path / "nope.bin"))
    with pytest.raises(StorageError, match="no parquet files"):
        (tmp_path / "empty").mkdir()
        st.read_parquet(str(tmp_path / "empty"))


def test_pickles_without_clients(bucket):
    import pickle

    st = Storage(endpoint_url="http://127.0.0.1:1", region="eu-west-1")
    _ = st.s3
    st2 = pickle.loads(pickle.dumps(st))
    assert st2.endpoint_url == "http://127.0.0.1:1" and st2.region == "eu-west-1"


def test_pyarrow_filesystem_reads_s3(bucket):
    import pyarrow.parquet as pq

    st = Storage()
    st.write_parquet(f"{bucket}/p/t.parquet", pa.table({"x": [1, 2, 3]}))
    fs, path = st.resolve(f"{bucket}/p/t.parquet")
    assert pq.read_table(path, filesystem=fs).column("x").to_pylist() == [1, 2, 3]


def test_wrong_credentials_named(monkeypatch):
    """A moto server that enforces IAM auth: unknown keys get a clear error naming the URI."""
    import os
    import subprocess
    import sys

    from conftest import free_port, wait_for_port

    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        st = Storage(endpoint_url=f"http://127.0.0.1:{port}")
        with pytest.raises(StorageError, match=r"s3://data/images: the AWS access key is not valid"):
            list(st.list("s3://data/images"))
        with pytest.raises(StorageError, match=r"s3://data/x\.json: the AWS access key is not valid"):
            st.write_json("s3://data/x.json", {})
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_s3_weights_are_read_once_per_node_and_again_when_the_file_changes(bucket, tmp_path, monkeypatch):
    """model.pretrained: s3://… — the first process on a node reads S3 and keeps a copy, which the next
    builds on the node read instead of S3; a replaced object (new ETag) is read again, a removed one is
    an error, never a stale copy."""
    import numpy as np
    from PIL import Image

    from near_ray.config import ModelConfig
    from near_ray.model.clip import create_clip, encode_images, save_weights
    from near_ray.model.staging import stage_weights
    from near_ray.model.weights import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    st = Storage()
    uri = f"{bucket}/weights/near-tiny.safetensors"
    staged = stage_weights(ModelConfig(arch="near-tiny", pretrained="synthetic"), uri, st)
    assert staged == {**staged, "arch": "near-tiny", "pretrained": uri, "pixels_match": True}
    images = [Image.fromarray(np.full((64, 64, 3), v, dtype=np.uint8)) for v in (30, 200)]
    shipped = encode_images(create_clip(ModelConfig(arch="near-tiny", pretrained="synthetic")), images)
    np.testing.assert_array_equal(encode_images(create_clip(ModelConfig(arch="near-tiny", pretrained=uri), st), images),
                                  shipped)
    (copy,) = (tmp_path / "cache").glob("*.safetensors")

    random = create_clip(ModelConfig(arch="near-tiny", pretrained="random"))
    copy.write_bytes(save_weights(random.model))  # the node's copy made recognisable: the next build reads it
    again = encode_images(create_clip(ModelConfig(arch="near-tiny", pretrained=uri), st), images)
    np.testing.assert_array_equal(again, encode_images(random, images))

    other = ModelConfig(arch="near-tiny", pretrained="random", init_seed=5)
    stage_weights(other, uri, st)  # the file replaced by other weights: a new ETag, read again
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    np.testing.assert_array_equal(encode_images(create_clip(ModelConfig(arch="near-tiny", pretrained=uri), st), images),
                                  encode_images(create_clip(other), images))
    st.delete(uri)
    with pytest.raises(Exception, match="near-tiny.safetensors"):
        create_clip(ModelConfig(arch="near-tiny", pretrained=uri), st)
