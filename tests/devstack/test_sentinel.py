"""The Sentinel topology's primitives, on real redis-server and sentinel processes."""

from __future__ import annotations

import time

import pytest
import redis

from invoice_worker.devstack.sentinel import ClusterError, SentinelCluster

pytestmark = pytest.mark.skipif(
    not SentinelCluster.available(), reason="needs redis-server (Sentinel runs in it)"
)


def test_starts_formed_and_names_its_master(sentinel_cluster: SentinelCluster) -> None:
    cluster = sentinel_cluster
    primary, replica = cluster.nodes
    assert cluster.master_views() == [primary.address] * 3
    assert cluster.master_address() == primary.address
    assert cluster.replicas == [replica]
    assert cluster.url.count("sentinel://") == 3
    # The replica follows the primary
    primary.client().set("k", "v")
    deadline = time.monotonic() + 5
    while replica.client().get("k") != b"v":
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_clean_failover_swaps_roles_and_keeps_the_data(sentinel_cluster: SentinelCluster) -> None:
    cluster = sentinel_cluster
    old = cluster.primary
    old.client().set("before", "1")
    old.client().wait(1, 2000)  # on the replica before the switch
    # When
    new = cluster.failover()
    # Then every sentinel names the new master, which has the data; the old one replicates it
    assert new is not old
    assert cluster.master_views() == [new.address] * 3
    assert new.client().get("before") == b"1"
    assert cluster.replicas == [old]
    with pytest.raises(redis.ReadOnlyError):
        old.client().set("x", "1")


def test_lossy_failover_loses_the_writes_the_replica_never_saw(
    sentinel_cluster: SentinelCluster,
) -> None:
    cluster = sentinel_cluster
    primary, replica = cluster.primary, cluster.replicas[0]
    writer = primary.client()
    writer.set("seen", "1")
    writer.wait(1, 2000)
    # Given a replica that stalls, and a primary that keeps taking writes until it drops it
    cluster.pause(replica)
    writer.set("maybe", "1")  # may still reach the replica's socket buffer
    cluster.wait_detached(replica)
    for i in range(20):
        writer.set(f"lost-{i}", "1")
    # When the primary crashes and the replica comes back
    cluster.kill(primary)
    cluster.resume(replica)
    new = cluster.wait_for_new_master(primary)
    # Then Sentinel promoted the replica, without the writes it never received
    assert new is replica
    reader = new.client()
    assert reader.get("seen") == b"1"
    assert reader.exists(*[f"lost-{i}" for i in range(20)]) == 0
    # And the old primary, restarted from its config, rejoins as a replica with nothing of them
    cluster.restart(primary)
    assert cluster.replicas == [primary]
    assert primary.client().exists("lost-0") == 0
    assert primary.client().get("seen") == b"1"


def test_paused_node_answers_nothing_until_resumed(sentinel_cluster: SentinelCluster) -> None:
    replica = sentinel_cluster.replicas[0]
    sentinel_cluster.pause(replica)
    with pytest.raises(redis.TimeoutError):
        replica.client(socket_timeout=0.3).ping()
    sentinel_cluster.resume(replica)
    assert replica.client().ping()


def test_options_reach_the_data_nodes() -> None:
    with SentinelCluster(redis_options={"appendonly": "yes", "appendfsync": "everysec"}) as cluster:
        for node in cluster.nodes:
            assert node.client().config_get("appendfsync") == {"appendfsync": "everysec"}
        primary = cluster.primary
        primary.client().set("durable", "1")
        time.sleep(1.2)  # everysec
        cluster.kill(primary)
        new = cluster.wait_for_new_master(primary)
        cluster.restart(primary)
        # The AOF brought the key back; the replica had it from the stream
        assert primary.client().get("durable") == b"1"
        assert new.client().get("durable") == b"1"


def test_password_protected_nodes_and_sentinels() -> None:
    with SentinelCluster(password="data-pw", sentinel_password="sentinel-pw") as cluster:
        assert cluster.url.startswith("sentinel://:data-pw@127.0.0.1:")
        with pytest.raises(redis.AuthenticationError):
            cluster.nodes[0].client(password=None).ping()
        new = cluster.failover()
        assert cluster.master_address() == new.address


def test_timeouts_name_what_did_not_happen_with_the_logs(
    sentinel_cluster: SentinelCluster,
) -> None:
    old = sentinel_cluster.primary
    with pytest.raises(
        ClusterError, match=r"promote a master other than redis-0(.|\n)*--- sentinel-0"
    ):
        sentinel_cluster.wait_for_new_master(old, timeout=0.2)


def test_a_restarted_sentinel_takes_up_its_rewritten_config(
    sentinel_cluster: SentinelCluster,
) -> None:
    cluster = sentinel_cluster
    sentinel = cluster.sentinels[0]
    new = cluster.failover()
    cluster.kill(sentinel)
    assert cluster.master_views()[0] is None
    cluster.restart(sentinel)
    assert sentinel.names_master(cluster.master_name) == new.address
