"""pipeline/cluster.py on a real two-node Ray cluster (both nodes on this machine; the worker node sees one folder
empty, as a node without the shared filesystem would)."""

from __future__ import annotations

import os

import pytest

from pipeline import cluster

pytestmark = pytest.mark.slow  # starts a two-node Ray cluster (~25 s)


@pytest.fixture(scope="module")
def connected(two_node_ray):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=two_node_ray.address, log_to_driver=False)
    yield two_node_ray
    ray.shutdown()


def _probes_left(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(cluster.PROBE_PREFIX)] if os.path.isdir(folder) else []


def test_paths_every_node_sees_pass_and_leave_nothing(connected, tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "a.jpg").write_bytes(b"x" * 10)
    cluster.check_paths_visible([tmp_path / "in", "s3://bucket/in"], tmp_path / "out")  # os.PathLike accepted
    assert not (tmp_path / "out").exists()  # the check creates nothing
    assert _probes_left(tmp_path) == []
    (tmp_path / "out").mkdir()
    cluster.check_paths_visible([], str(tmp_path / "out"))  # an existing output is probed from inside
    assert _probes_left(tmp_path / "out") == []


def test_output_a_node_cannot_see_is_refused_with_node_path_and_hint(connected):
    hidden = connected.hidden[0]
    out = os.path.join(hidden, "run-1", "out")
    with pytest.raises(cluster.ClusterPathError) as e:
        cluster.check_paths_visible([], out)
    import ray

    message = str(e.value)
    assert f"does not see the local output {out} (no probe file" in message and "\n" not in message
    assert message.endswith(": use s3:// or a filesystem shared by all nodes")
    head = ray.get_runtime_context().get_node_id()  # the driver's node sees everything: the other one is named
    (worker,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head]
    assert message.startswith("Ray node ") and f"(id {worker[:12]})" in message
    assert isinstance(e.value, cluster.UserError)
    assert _probes_left(hidden) == [] and not os.path.exists(os.path.join(hidden, "run-1"))


def test_input_a_node_cannot_see_is_refused(connected, tmp_path, monkeypatch):
    hidden = connected.hidden[0]
    os.makedirs(os.path.join(hidden, "photos"), exist_ok=True)
    with open(os.path.join(hidden, "photos", "a.jpg"), "wb") as f:
        f.write(b"x")
    with pytest.raises(cluster.ClusterPathError, match=r"does not see the local input .*photos \(no a\.jpg in it on the node\)"):
        cluster.check_paths_visible([os.path.join(hidden, "photos")], "s3://bucket/out")
    single = os.path.join(hidden, "photos", "a.jpg")
    with pytest.raises(cluster.ClusterPathError, match=r"a\.jpg \(missing on the node\)"):
        cluster.check_paths_visible([single], tmp_path / "out")


def test_cluster_found_through_ray_address(two_node_ray, tmp_path, monkeypatch):
    """The same refusal when the driver connects with a plain ray.init() and RAY_ADDRESS (as `jpeglm preprocess`
    does without --address)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("RAY_ADDRESS", two_node_ray.address)
    ray.init(log_to_driver=False)
    try:
        assert sum(n["Alive"] for n in ray.nodes()) == 2
        with pytest.raises(cluster.ClusterPathError, match="output"):
            cluster.check_paths_visible([], os.path.join(two_node_ray.hidden[0], "out"))
    finally:
        ray.shutdown()
