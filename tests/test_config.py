"""Configuration: unknown keys, value checks, aliases, precedence and the example file.

Every error is one line naming the file (or what set the value), the key, the bad value
and what is allowed (CONTRACT §5).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from nexus import config as config_mod
from nexus.errors import ConfigError

BACKEND = '[[backends]]\nname = "a"\nurl = "http://127.0.0.1:11434"\ntype = "generic"\n'


@pytest.fixture(autouse=True)
def _no_implicit_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty directory, so an implicit ./nexus.toml never leaks in."""
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "nexus.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config_mod.load(path, env=env or {})
    message = str(info.value)
    assert "\n" not in message
    return message


def build_error(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_mod.build(raw, source="f.toml")
    message = str(info.value)
    assert "\n" not in message
    return message


# -- unknown keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("bogus = 1\n", "bogus", "server, discovery, health_check, routing, backends, logging, quality, queue, state, plugins"),
        ("[server]\nprot = 8000\n", "server.prot", "host, port, request_timeout_seconds"),
        (BACKEND + 'zonee = "open"\n', "backends[0].zonee", "name, url, type, priority, api_key_env, zone, tier"),
        ("[routing.weights]\npriority = 50\nload = 30\nlatency = 20\nlatncy = 1\n", "routing.weights.latncy",
         "priority, load, latency"),
    ],
    ids=["top-level", "section", "backends", "routing.weights"],
)
def test_unknown_key_is_one_line_naming_key_file_and_allowed_keys(tmp_path: Path, text: str, key: str,
                                                                   allowed: str) -> None:
    path = write(tmp_path, text)
    message = load_error(path)
    assert message.startswith(f"{path}: unknown config key '{key}'"), message
    assert f"(allowed here: {allowed}" in message


def test_plugin_tables_are_free_form() -> None:
    config = config_mod.build({"plugins": {"acme": {"anything": 1, "nested": {"deep": True}}}})
    assert config.plugins["acme"] == {"anything": 1, "nested": {"deep": True}}


# -- bad values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"backends": [{"name": "a", "url": "http://x", "type": "generic", "tier": 0}]},
         "f.toml: backends[0].tier = 0 is invalid: expected a tier 1-5"),
        ({"backends": [{"name": "a", "url": "http://x", "type": "generic", "tier": 6}]},
         "f.toml: backends[0].tier = 6 is invalid: expected a tier 1-5"),
        ({"backends": [{"name": "a", "url": "http://x", "type": "generic", "zone": "Secret"}]},
         "f.toml: backends[0].zone = 'Secret' is invalid: expected 'restricted' or 'open'"),
        ({"server": {"port": 0}}, "f.toml: server.port = 0 is invalid: expected a port 1-65535"),
        ({"server": {"port": 65536}}, "f.toml: server.port = 65536 is invalid: expected a port 1-65535"),
        ({"server": {"port": "abc"}}, "f.toml: server.port = 'abc' is invalid: expected `int`, got `str`"),
        ({"server": {"port": True}}, "f.toml: server.port = True is invalid: expected `int`, got `bool`"),
        ({"routing": {"strategy": "fastest"}},
         "f.toml: routing.strategy = 'fastest' is invalid: expected one of 'smart', 'round_robin', "
         "'priority_only', 'random'"),
        ({"logging": {"level": "loud"}},
         "f.toml: logging.level = 'loud' is invalid: expected one of 'trace', 'debug', 'info', 'warn', "
         "'warning', 'error'"),
        ({"routing": {"weights": {"priority": 50}}}, "f.toml: missing required key 'routing.weights.load'"),
        ({"backends": [{"name": "a", "type": "generic"}]}, "f.toml: missing required key 'backends[0].url'"),
        ({"backends": [{"name": " ", "url": "http://x", "type": "generic"}]},
         "f.toml: backends[0].name = ' ' is invalid: expected a non-empty name"),
    ],
    ids=["tier-0", "tier-6", "zone", "port-0", "port-65536", "port-str", "port-bool", "strategy", "log-level",
         "weights-incomplete", "backend-without-url", "blank-name"],
)
def test_bad_value_names_key_value_and_what_is_allowed(raw: dict[str, Any], expected: str) -> None:
    assert build_error(raw) == expected


@pytest.mark.parametrize("url", ["ftp://x", "not a url", "http://", "http://[::1", "http://host:port"])
def test_bad_backend_url(url: str) -> None:
    message = build_error({"backends": [{"name": "a", "url": url, "type": "generic"}]})
    assert message == f"f.toml: backends[0].url = {url!r} is invalid: expected an http:// or https:// URL with a host"


def test_duplicate_backend_names() -> None:
    backends = [{"name": "a", "url": "http://x", "type": "generic"},
                {"name": "a", "url": "http://y", "type": "generic"}]
    assert build_error({"backends": backends}) == (
        "f.toml: backends[1].name = 'a' is invalid: backend names must be unique"
    )


@pytest.mark.parametrize("zone", ["Restricted", "OPEN", "open"])
def test_zone_is_case_insensitive_and_normalised(zone: str) -> None:
    config = config_mod.build({"backends": [{"name": "a", "url": "http://x", "type": "generic", "zone": zone}]})
    assert config.backends[0].zone == zone.lower()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"plugins": {"acme": 1}}, "f.toml: plugins.acme = 1 is invalid: expected `object`, got `int`"),
        ({"routing": {"fallbacks": {"llama3.1:8b": ["x"], "llama3.1:70b": "llama3.1:8b"}}},
         "f.toml: routing.fallbacks.\"llama3.1:70b\" = 'llama3.1:8b' is invalid: expected `array`, got `str`"),
        ({"routing": {"aliases": {"gpt-4": 4}}},
         "f.toml: routing.aliases.gpt-4 = 4 is invalid: expected `str`, got `int`"),
        ({"logging": {"component_levels": {"routing": "loud"}}},
         "f.toml: logging.component_levels.routing = 'loud' is invalid: expected one of 'trace', 'debug', 'info', "
         "'warn', 'warning', 'error'"),
    ],
    ids=["plugins", "fallbacks", "aliases", "component-levels"],
)
def test_bad_value_inside_a_table_names_its_key(raw: dict[str, Any], expected: str) -> None:
    assert build_error(raw) == expected


# -- aliases ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aliases", "chain"),
    [({"a": "b", "b": "a"}, "a -> b -> a"), ({"a": "a"}, "a -> a"), ({"x": "a", "a": "b", "b": "c", "c": "a"},
                                                                      "x -> a -> b -> c -> a")],
    ids=["two", "self", "behind-a-prefix"],
)
def test_alias_cycle_is_rejected(aliases: dict[str, str], chain: str) -> None:
    message = build_error({"routing": {"aliases": aliases}})
    assert message.startswith("f.toml: routing.aliases has a cycle: "), message
    assert f"({chain})" in message


def test_alias_resolution_stops_after_three_hops() -> None:
    aliases = {"a": "b", "b": "c", "c": "d", "d": "e"}
    config_mod.build({"routing": {"aliases": aliases}})  # a long chain is not a cycle
    assert config_mod.resolve_alias(aliases, "a") == "d"
    assert config_mod.resolve_alias(aliases, "c") == "e"
    assert config_mod.resolve_alias(aliases, "e") == "e"


# -- files --------------------------------------------------------------------------------


def test_invalid_toml_names_the_file_and_position(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = \n")
    message = load_error(path)
    assert message.startswith(f"{path}: invalid TOML: "), message
    assert "line 2" in message


def test_file_that_is_not_utf8_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[server]\nhost = "caf\u00e9"\n'.encode("latin-1"))
    assert load_error(path) == f"{path}: invalid TOML: not UTF-8 text (line 2)"


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    assert load_error(tmp_path / "absent.toml") == f"{tmp_path / 'absent.toml'}: config file not found"


def test_missing_implicit_file_means_defaults() -> None:
    assert config_mod.load(None, env={}) == config_mod.build({})


def test_implicit_file_in_the_working_directory_is_read(tmp_path: Path) -> None:
    write(tmp_path, "[server]\nport = 9100\n")
    assert config_mod.load(None, env={}).server.port == 9100


def test_nexus_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9101\n", name="elsewhere.toml")
    assert config_mod.load(None, env={"NEXUS_CONFIG": str(path)}).server.port == 9101
    other = write(tmp_path, "[server]\nport = 9102\n", name="flag.toml")
    assert config_mod.load(other, env={"NEXUS_CONFIG": str(path)}).server.port == 9102  # -c beats the env
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match="missing.toml: config file not found"):
        config_mod.load(None, env={"NEXUS_CONFIG": str(missing)})


def test_example_config_parses_to_the_defaults_exactly() -> None:
    text = resources.files("nexus").joinpath("nexus.example.toml").read_text(encoding="utf-8")
    import tomllib

    assert config_mod.build(tomllib.loads(text), source="nexus.example.toml") == config_mod.build({})


# -- precedence: CLI > NEXUS_* env > file > default ---------------------------------------


def test_precedence_cli_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 9001\nhost = "10.0.0.1"\n[logging]\nlevel = "warn"\n', name="my.toml")
    env = {"NEXUS_PORT": "9002", "NEXUS_LOG_LEVEL": "DEBUG"}
    cli = {("server", "port"): 9003, ("server", "host"): None}  # None: the flag was not given

    config = config_mod.load(path, env=env, overrides=cli)
    assert (config.server.port, config.server.host, config.logging.level) == (9003, "10.0.0.1", "debug")
    config = config_mod.load(path, env=env)
    assert (config.server.port, config.logging.level) == (9002, "debug")
    config = config_mod.load(path, env={})
    assert (config.server.port, config.logging.level) == (9001, "warn")
    config = config_mod.load(None, env={})
    assert (config.server.port, config.server.host, config.logging.level) == (8000, "127.0.0.1", "info")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"NEXUS_DISCOVERY": "false", "NEXUS_HEALTH_CHECK": "0"}, (False, False)),
        ({"NEXUS_DISCOVERY": "Yes", "NEXUS_HEALTH_CHECK": "on"}, (True, True)),
    ],
)
def test_boolean_environment_variables(env: dict[str, str], expected: tuple[bool, bool]) -> None:
    config = config_mod.load(None, env=env)
    assert (config.discovery.enabled, config.health_check.enabled) == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"NEXUS_PORT": "abc"}, "environment NEXUS_PORT='abc' is invalid: expected an integer"),
        ({"NEXUS_DISCOVERY": "maybe"}, "environment NEXUS_DISCOVERY='maybe' is invalid: expected true or false"),
        ({"NEXUS_PORT": "0"}, "environment NEXUS_PORT: server.port = 0 is invalid: expected a port 1-65535"),
        ({"NEXUS_LOG_FORMAT": "xml"},
         "environment NEXUS_LOG_FORMAT: logging.format = 'xml' is invalid: expected one of 'pretty', 'json'"),
    ],
    ids=["port-abc", "discovery-maybe", "port-0", "log-format"],
)
def test_invalid_environment_value_is_a_clear_error(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    path = write(tmp_path, "[server]\nport = 9000\n")
    assert load_error(path, env=env) == expected


def test_empty_host_is_rejected_rather_than_binding_every_interface(tmp_path: Path) -> None:
    assert load_error(write(tmp_path, "[server]\nhost = \"\"\n")) == (
        f"{tmp_path / 'nexus.toml'}: server.host = '' is invalid: expected an address such as 127.0.0.1, "
        "or 0.0.0.0 for every interface")
    assert load_error(tmp_path / "nexus.toml", env={"NEXUS_HOST": " ", "NEXUS_CONFIG": "ignored"}).startswith(
        "environment NEXUS_HOST: server.host = '' is invalid")


def test_invalid_command_line_value_is_not_blamed_on_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9000\n")
    with pytest.raises(ConfigError) as info:
        config_mod.load(path, env={}, overrides={("server", "port"): 0})
    assert str(info.value) == "command line: server.port = 0 is invalid: expected a port 1-65535"


def test_env_value_for_a_section_that_is_not_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, "server = 5\n")
    assert load_error(path, env={"NEXUS_PORT": "1"}) == f"{path}: server = 5 is invalid: expected a table"


def test_documented_keys_cover_every_section() -> None:
    keys = config_mod.documented_keys()
    assert {"server.port", "routing.weights.priority", "backends.zone", "logging.level", "plugins"} <= set(keys)
    assert len(keys) == len(set(keys))
