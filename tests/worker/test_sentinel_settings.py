"""``D2R_BROKER_URL=sentinel://...`` and ``D2R_BROKER_SENTINEL_MASTER``: parsing, refusal of
malformed lists, the Celery configuration and the queue-depth client they produce."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2r_core.errors import ConfigError
from observability.metrics import QueueDepthCollector
from worker.celery_app import (
    SENTINEL_PUBLISH_RETRY_SECONDS,
    celery_config,
    create_app,
    sentinel_publish_retry_policy,
)
from worker.messages import REPORT_QUEUE, SEND_QUEUE
from worker.settings import WorkerSettings

THREE = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26380;sentinel://sentinel-3"


def _settings(**env: str) -> WorkerSettings:
    return WorkerSettings.from_env(env)


def test_a_sentinel_list_and_the_default_master() -> None:
    settings = _settings(D2R_BROKER_URL=THREE)
    assert settings.broker_url == THREE
    assert settings.broker_sentinel_master == "d2r"


def test_spaces_around_the_separator_are_dropped() -> None:
    settings = _settings(D2R_BROKER_URL=THREE.replace(";", " ; "))
    assert settings.broker_url == THREE


@pytest.mark.parametrize("name", ["mymaster", "d2r-prod_1.a", "A" * 128])
def test_a_master_name(name: str) -> None:
    settings = _settings(D2R_BROKER_URL=THREE, D2R_BROKER_SENTINEL_MASTER=name)
    assert settings.broker_sentinel_master == name


@pytest.mark.parametrize("name", ["my master", "d2r/x", "d2r;x", "A" * 129, "é"])
def test_a_master_name_outside_letters_digits_dot_dash_underscore_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="^D2R_BROKER_SENTINEL_MASTER: "):
        _settings(D2R_BROKER_URL=THREE, D2R_BROKER_SENTINEL_MASTER=name)


def test_a_password_and_database_on_every_entry() -> None:
    url = "sentinel://:s3cret@a:26379/2;sentinel://:s3cret@b:26379/2"
    assert _settings(D2R_BROKER_URL=url).broker_url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sentinel://", "entry 1: no host"),
        ("sentinel://a:1;", "entry 2: expected sentinel://host:port"),
        ("sentinel://a:1;;sentinel://b:2", "entry 2: expected sentinel://host:port"),
        ("sentinel://a:1;redis://b:6379/0", "entry 2: expected sentinel://host:port"),
        ("sentinel://a:port", "entry 1: the port is not a number"),
        ("sentinel://a:0", "entry 1: the port is not a number"),
        ("sentinel://a:1;sentinel://b:70000", "entry 2: the port is not a number"),
        ("sentinel://a:1/queue", "entry 1: the database must be a number"),
        ("sentinel://a:1?ssl=true", "entry 1: unexpected"),
        ("sentinel://:s3cret@a:1;sentinel://b:2", "entry 2: every entry must name the same"),
        ("sentinel://a:1/0;sentinel://b:2/1", "entry 2: every entry must name the same"),
    ],
)
def test_a_malformed_sentinel_list_is_refused_naming_the_setting(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^D2R_BROKER_URL: ") as info:
        _settings(D2R_BROKER_URL=url)
    assert message in str(info.value)
    assert "s3cret" not in str(info.value)


def test_the_placeholder_password_is_refused_without_echoing_the_url() -> None:
    with pytest.raises(ConfigError, match="^D2R_BROKER_URL: .*CHANGE-ME placeholder") as info:
        _settings(D2R_BROKER_URL="sentinel://:CHANGE-ME@a:26379;sentinel://:CHANGE-ME@b:26379")
    assert "sentinel://" not in str(info.value)


def test_the_error_for_an_unknown_scheme_names_the_sentinel_form() -> None:
    with pytest.raises(ConfigError, match="^D2R_BROKER_URL: .*sentinel://host:port;"):
        _settings(D2R_BROKER_URL="sentinels://a:1")


def test_celery_config_of_a_sentinel_broker() -> None:
    settings = _settings(
        D2R_BROKER_URL=THREE, D2R_BROKER_SENTINEL_MASTER="hospital", D2R_VISIBILITY_TIMEOUT="900"
    )
    config = celery_config(settings)
    options = config["broker_transport_options"]
    assert options["master_name"] == "hospital"
    assert options["visibility_timeout"] == 900.0
    assert options["unacked_restore_interval"] == 5
    assert options["unacked_restore_throttle"] == 1
    assert 0 < options["socket_connect_timeout"] <= options["socket_timeout"]
    assert options["connect_retries_timeout"] == SENTINEL_PUBLISH_RETRY_SECONDS
    assert config["broker_url"] == THREE
    assert config["broker_connection_retry"] is True
    assert config["broker_connection_retry_on_startup"] is True
    policy = config["task_publish_retry_policy"]
    assert policy == sentinel_publish_retry_policy(settings)
    # kombu tries each of the 3 sentinel entries once per interval: 0, 0.5, then 1 s
    assert policy["max_retries"] == 3 * (int(SENTINEL_PUBLISH_RETRY_SECONDS) + 1)
    assert (policy["interval_start"], policy["interval_step"], policy["interval_max"]) == (
        0.0,
        0.5,
        1.0,
    )


def test_a_plain_redis_broker_keeps_its_configuration() -> None:
    config = celery_config(_settings(D2R_BROKER_URL="redis://127.0.0.1:6379/0"))
    assert "master_name" not in config["broker_transport_options"]
    assert "connect_retries_timeout" not in config["broker_transport_options"]
    assert "task_publish_retry_policy" not in config


def test_kombu_reads_the_sentinel_list_as_one_broker_with_alternates() -> None:
    app = create_app(_settings(D2R_BROKER_URL=THREE))
    with app.connection_for_write() as conn:  # nothing is connected
        assert type(conn.transport).__name__ == "SentinelTransport"
        assert conn.alt == THREE.split(";")
        assert conn.transport_options["master_name"] == "d2r"


def test_the_queue_depth_client_asks_the_sentinels_for_the_master(tmp_path: Path) -> None:
    url = "sentinel://:s3cret@a:26379/3;sentinel://:s3cret@b:26380/3;sentinel://:s3cret@c/3"
    collector = QueueDepthCollector(
        url, tmp_path, (REPORT_QUEUE, SEND_QUEUE), sentinel_master="hospital"
    )
    client = collector.redis()  # nothing is connected until a command runs
    pool = client.connection_pool
    assert pool.service_name == "hospital"
    sentinels = [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in pool.sentinel_manager.sentinels
    ]
    assert sentinels == [("a", 26379), ("b", 26380), ("c", 26379)]
    assert pool.connection_kwargs["password"] == "s3cret"
    assert pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["socket_timeout"] == 2.0
    # the sentinels themselves are asked without the master's password
    for sentinel in pool.sentinel_manager.sentinels:
        assert sentinel.connection_pool.connection_kwargs.get("password") is None


def test_the_node_logs_its_broker_without_any_password() -> None:
    from cli.runtime import without_credentials

    logged = without_credentials("sentinel://:s3cret@a:26379;sentinel://:s3cret@b:26379/0")
    assert logged == "sentinel://a:26379;sentinel://b:26379/0"
    assert without_credentials("redis://user:s3cret@h:6379/0") == "redis://h:6379/0"
    assert without_credentials("filesystem://") == "filesystem://"
