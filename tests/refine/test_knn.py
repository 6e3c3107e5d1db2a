import numpy as np
import pytest

from near_ray.refine.knn import KnnError, brute_force_knn, choose_index, knn


def _unit(n, d, seed=0, clusters=None):
    rng = np.random.default_rng(seed)
    if clusters:  # clustered data, like image embeddings of a few classes
        centers = rng.normal(size=(clusters, d))
        x = centers[rng.integers(clusters, size=n)] + 0.6 * rng.normal(size=(n, d))
    else:
        x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _exact(x, k):  # numpy reference, cheaper than a full sort for the recall tests
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return np.argpartition(-sims, k, axis=1)[:, :k]


def _recall(found, truth):
    return np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])


def test_flat_equals_brute_force():
    x = _unit(500, 32)
    ids, sims = knn(x, 7, index="flat", use_gpu="no")
    ref_ids, ref_sims = brute_force_knn(x, 7)
    assert ids.shape == (500, 7) and sims.dtype == np.float32
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert (ids == ref_ids).mean() > 0.999  # only float ties may order differently
    assert not (ids == np.arange(500)[:, None]).any()  # never itself
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # most similar first


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
@pytest.mark.parametrize("clusters", [None, 20])
def test_approximate_indexes_have_high_recall(kind, clusters):
    x = _unit(3000, 48, seed=1, clusters=clusters)
    ids, sims = knn(x, 10, index=kind, use_gpu="no")
    assert _recall(ids, _exact(x, 10)) >= 0.9
    assert not (ids == np.arange(len(x))[:, None]).any()


def test_auto_switches_to_an_approximate_index_above_exact_max_n():
    assert choose_index(100, "auto", exact_max_n=1000) == "flat"
    assert choose_index(5000, "auto", exact_max_n=1000) == "ivf"
    x = _unit(3000, 16, seed=2, clusters=10)
    ids, _ = knn(x, 5, index="auto", exact_max_n=1000, use_gpu="no")
    assert _recall(ids, _exact(x, 5)) >= 0.9


def test_tiny_inputs():
    one = _unit(1, 8)
    ids, sims = knn(one, 10)
    assert ids.shape == (1, 0) and sims.shape == (1, 0)
    two = _unit(2, 8)
    ids, sims = knn(two, 10)
    assert ids.tolist() == [[1], [0]]
    np.testing.assert_allclose(sims[:, 0], float(two[0] @ two[1]), atol=1e-6)
    ids, _ = knn(np.zeros((0, 8), np.float32), 3)
    assert ids.shape == (0, 0)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_duplicates_find_each_other_and_never_themselves(kind):
    base = _unit(3000, 16, seed=3)
    x = np.concatenate([base, base[:5], base[:5]])  # rows i, 3000+i, 3005+i identical for i < 5
    ids, sims = knn(x, 3, index=kind, use_gpu="no")
    n = len(base)
    for i in range(5):
        for row, twins in ((i, {n + i, n + 5 + i}), (n + i, {i, n + 5 + i}), (n + 5 + i, {i, n + i})):
            assert row not in ids[row]
            assert twins <= set(ids[row][:2].tolist())
            np.testing.assert_allclose(sims[row][:2], 1.0, atol=1e-5)


def test_k_is_clipped_and_bad_input_is_named():
    x = _unit(4, 8)
    ids, _ = knn(x, 100)
    assert ids.shape == (4, 3)
    assert all(sorted(row) == sorted(set(range(4)) - {i}) for i, row in enumerate(ids.tolist()))
    with pytest.raises(KnnError, match="2-D"):
        knn(np.zeros(5, np.float32), 3)
    with pytest.raises(KnnError, match="unknown index"):
        knn(x, 2, index="lsh")


def test_gpu_required_without_gpu_is_a_clear_error():
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("this machine has a GPU")
    with pytest.raises(KnnError, match="no GPU"):
        knn(_unit(10, 8), 3, use_gpu="yes")


# ------------------------------------------------------------------------------------------ GPU, as far as a CPU can tell
def test_gpu_search_limits_fall_back_to_the_cpu_with_a_log_line(caplog):
    import logging

    import faiss

    from near_ray.refine.knn import GPU_MAX_K, _approximate, gpu_refusal

    x = _unit(2200, 8, seed=4)
    with caplog.at_level(logging.INFO, logger="near_ray.refine.knn"):
        _, _, on_gpu = _approximate(x, 10, "ivf", gpu=True, seed=0)  # asked for the GPU
    assert on_gpu is (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)
    if not hasattr(faiss, "StandardGpuResources"):
        assert any("no GPU support" in r.message and "on the CPU" in r.message for r in caplog.records)
    # The limits, as a GPU build of FAISS checks them:
    assert gpu_refusal("ivf", 10, 64, gpu_build=True) is None and gpu_refusal("flat", 10, gpu_build=True) is None
    assert "selection limit" in gpu_refusal("ivf", GPU_MAX_K, 8, gpu_build=True)
    assert gpu_refusal("ivf", GPU_MAX_K - 1, 8, gpu_build=True) is None  # k + 1 = 2048 still fits
    assert "nprobe=4096" in gpu_refusal("ivf", 10, 4096, gpu_build=True)
    assert "HNSW" in gpu_refusal("hnsw", 10, gpu_build=True)


def test_the_driver_never_takes_a_gpu_and_yes_names_the_setting(ray_cluster):
    from near_ray.refine.knn import assigned_gpu, wants_gpu

    assert not assigned_gpu()  # Ray assigned the driver no GPU, whatever the machine has
    assert wants_gpu("auto") is False
    with pytest.raises(KnnError, match="refine.knn_gpus"):
        wants_gpu("yes")


def test_knn_with_knn_gpus_is_a_ray_task_that_reserves_one_gpu(ray_cluster):
    import ray

    from near_ray.config import RefineConfig
    from near_ray.refine.knn import knn_for_config, knn_task_options, resolve

    x = _unit(300, 16, seed=5)
    assert knn_task_options(RefineConfig()) is None  # default: no GPU, searched where the stage runs
    local = knn_for_config(x, RefineConfig(k=5))
    assert isinstance(local, tuple)
    np.testing.assert_array_equal(resolve(local)[0], knn(x, 5, use_gpu="no")[0])
    options = knn_task_options(RefineConfig(knn_gpus=1, knn_cpus=2))
    assert (options["num_gpus"], options["num_cpus"]) == (1, 2)
    ref = knn_for_config(x, RefineConfig(k=5, knn_gpus=1))
    assert isinstance(ref, ray.ObjectRef)
    ready, _ = ray.wait([ref], timeout=3)
    assert not ready, "this cluster has no GPU: a task that reserves one cannot have run"
    ray.cancel(ref, force=True)


def test_exact_search_over_several_database_tiles_equals_brute_force(monkeypatch):
    """N = 1M never holds N² similarities: the exact path tiles the database. Force small tiles and
    blocks (a partial last tile and block included) and compare with numpy."""
    from near_ray.refine import knn as knn_mod

    monkeypatch.setattr(knn_mod, "_QUERY_BLOCK", 256)
    monkeypatch.setattr(knn_mod, "_TILE_FLOATS", 256 * 300)  # 300 database columns per product
    base = _unit(1000, 24, seed=6)
    x = np.concatenate([base, base[:3]])  # twins across tiles: rows i and 1000+i
    ids, sims = knn_mod.knn(x, 9, index="flat", use_gpu="no")
    ref_ids, ref_sims = brute_force_knn(x, 9)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert (ids == ref_ids).mean() > 0.999
    assert not (ids == np.arange(len(x))[:, None]).any()
    for i in range(3):
        assert ids[i, 0] == 1000 + i and ids[1000 + i, 0] == i
