"""The part table and the resume ledger every writing stage shares: atomic parts, the newest-part rule,
repair, and a partitioned ledger that claims each image once and skips what the table holds."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from near_ray.parts import PartTable, ResumeLedger, ResumeRule
from near_ray.parts.keys import KeySet, digests
from near_ray.storage import Storage, StorageError

SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("domain", pa.string()),
                    ("version", pa.string()), ("status", pa.string())])  # fmt: skip
RULE = ResumeRule(version_column="version", versions={"birds": "v1", "cars": "v1"})


def rows(uris: list[str], domain: str = "birds", version: str = "v1", ids: list[str] | None = None) -> list[dict]:
    return [{"uri": u, "image_id": i, "domain": domain, "version": version, "status": "ok"}
            for u, i in zip(uris, ids or uris, strict=True)]  # fmt: skip


def test_a_failed_write_leaves_no_part_and_keeps_its_rows(tmp_path):
    class Flaky(Storage):
        failures = 1

        def write_bytes(self, uri, data):
            if self.failures:  # the write dies half-way: a temporary file, never the part's name
                self.failures -= 1
                (tmp_path / "t" / "domain=birds").mkdir(parents=True, exist_ok=True)
                (tmp_path / "t" / "domain=birds" / ".part-x.parquet.tmp").write_bytes(data[: len(data) // 2])
                raise StorageError(f"{uri}: connection reset")
            return super().write_bytes(uri, data)

    table = PartTable(str(tmp_path / "t"), Flaky(), SCHEMA, part_rows=10, flush_interval_s=60)
    table.add(rows(["a", "b"]))
    with pytest.raises(StorageError):
        table.flush()
    assert table.read() is None and table.part_files() == {}, "nothing half-written is read"
    table.flush()  # the stage's final flush writes what the failed one kept
    assert sorted(table.read()["uri"].to_pylist()) == ["a", "b"] and table.parts_written == 1


def test_the_newest_file_of_a_part_wins_and_repair_deletes_the_older(tmp_path):
    st = Storage()
    table = PartTable(str(tmp_path / "t"), st, SCHEMA)
    old = table.write("birds", table.as_table(rows(["a", "b"])), part_id="0000beef")
    table.write("cars", table.as_table(rows(["c"], domain="cars")))
    # a rewrite of the part (the cascade's), killed before it deleted the old file: two files, one id
    new = table.write("birds", table.as_table(rows(["a", "b"], version="v2")), part_id="0000beef")
    assert [f for _, f in table.part_files()["birds"]] == [new]
    assert table.read()["version"].to_pylist() == ["v2", "v2", "v1"], "every row once, from the newest file"
    assert table.repair() == 1 and not (tmp_path / old).exists()
    assert sorted(table.listing()) == sorted(f for ps in table.part_files().values() for _, f in ps)
    assert table.repair() == 0


def test_an_image_is_claimed_once_across_partitions(tmp_path):
    ledger = ResumeLedger.open(PartTable(str(tmp_path / "t"), Storage(), SCHEMA), RULE, partitions=4, local=True)
    # 40 distinct images, each listed under two URIs of one domain, and once under another domain
    items = [(f"s3://b/{u}{i}.jpg", "birds", f"id{i}") for u in "xy" for i in range(40)]
    items += [(f"s3://c/{i}.jpg", "cars", f"id{i}") for i in range(40)]
    plans = ledger.plan(items)
    assert plans == [[0]] * 40 + [[]] * 40 + [[0]] * 40, "x asked, y copied, cars asked under its own domain"
    assert ledger.plan(items[:5]) == [[0]] * 5, "the same URI again (a retried task) is still its owner"
    aliases = [a for batch in ledger.aliases(batch=7) for a in batch]
    assert sorted(a["uri"] for a in aliases) == sorted(f"s3://b/y{i}.jpg" for i in range(40))
    assert all(len(a._obj._claimed) for a in ledger.actors), "the images are spread over every partition"
    c = ledger.counts()
    assert (c["images_seen"], c["samples_asked"], c["samples_copied"]) == (125, 85, 40)


def test_a_resume_skips_what_the_table_holds_and_copies_identical_bytes(tmp_path):
    table = PartTable(str(tmp_path / "t"), Storage(), SCHEMA, part_rows=3)
    table.add(rows([f"{i}.jpg" for i in range(10)]))
    table.add(rows(["old.jpg"], version="v0"))  # another version: computed again, its part is stale
    table.flush()
    ledger = ResumeLedger.open(table, RULE, partitions=3, local=True)
    items = [(f"{i}.jpg", "birds", f"{i}.jpg") for i in range(12)] + [("old.jpg", "birds", "old.jpg"),
                                                                       ("twin.jpg", "birds", "3.jpg")]  # fmt: skip
    assert ledger.plan(items) == [[]] * 10 + [[0], [0], [0], []]
    c = ledger.counts()
    assert (c["images_skipped"], c["samples_asked"], c["samples_copied"]) == (10, 3, 1)
    assert len(ledger.stale_parts) == 1 and ledger.loaded["final_rows"] == 10


def test_a_first_run_sizes_the_ledger_for_the_rows_it_may_write(tmp_path):
    table = PartTable(str(tmp_path / "t"), Storage(), SCHEMA)  # empty: nothing to size it from but the listing
    assert ResumeLedger.open(table, RULE, local=True).loaded["partitions"] == 1
    ledger = ResumeLedger.open(table, RULE, expected_rows=25_000_000, local=True)
    assert ledger.loaded["partitions"] == 3, "one partition per 10M rows the manifests say the run may write"


def test_the_ledger_runs_as_ray_actors_loaded_by_tasks(ray_cluster, tmp_path):
    table = PartTable(str(tmp_path / "t"), Storage(), SCHEMA, part_rows=4)
    for i in range(0, 20, 4):
        table.add(rows([f"{j}.jpg" for j in range(i, i + 4)]))
    ledger = ResumeLedger.open(table, RULE, partitions=3)
    try:
        items = [(f"{i}.jpg", "birds", f"{i}.jpg") for i in range(25)] + [("dup.jpg", "birds", "21.jpg")]
        assert ledger.plan(items) == [[]] * 20 + [[0]] * 5 + [[]]
        assert ledger.loaded == {**ledger.loaded, "partitions": 3, "parts": 5, "final_rows": 20}
        assert [a["uri"] for b in ledger.aliases() for a in b] == ["dup.jpg"]
    finally:
        ledger.close()


def test_the_key_set_matches_a_python_set_as_it_grows():
    rng = np.random.default_rng(0)
    ks, reference = KeySet(with_values=True), {}
    for step in range(60):  # batches of growing size: runs are merged as they come
        keys = digests([f"k{int(x)}" for x in rng.integers(0, 3000, size=step * 7 + 1)])
        values = np.arange(len(keys), dtype=np.uint64) + np.uint64(step * 1000)
        for k, v in zip(map(tuple, keys.tolist()), values.tolist(), strict=True):
            reference.setdefault(k, v)
        ks.add(keys, values)
    probe = digests([f"k{i}" for i in range(4000)])
    found, values = ks.get(probe)
    expected = [tuple(k) in reference for k in probe.tolist()]
    assert found.tolist() == expected
    assert [int(v) for v, f in zip(values, found, strict=True) if f] == [
        reference[tuple(k)] for k, f in zip(probe.tolist(), found, strict=True) if f]  # fmt: skip
    assert len(ks._runs) <= int(np.log2(len(reference))) + 2, "O(log n) runs"
    ks.compact()
    assert len(ks) == len(reference) and ks.get(probe)[1].tolist() == values.tolist()


def test_a_lost_ledger_partition_is_named_through_ray_datas_wrapping(ray_cluster):
    """A read task's LedgerLostError reaches the driver wrapped by Ray Data (and its causes do not travel between
    processes): the stages still stop with the ledger's message, not the wrapper's trace."""
    import ray

    from near_ray.parts import LedgerLostError, lost_partition

    def plan(batch):
        raise LedgerLostError("a partition is gone")

    with pytest.raises(Exception) as info:
        ray.data.range(4).map_batches(plan).materialize()
    assert not isinstance(info.value, LedgerLostError)  # what the driver gets is Ray Data's error
    lost = lost_partition(info.value)
    assert isinstance(lost, LedgerLostError) and str(lost).startswith("the resume ledger lost a partition")
    assert lost_partition(ValueError("no ledger here")) is None
