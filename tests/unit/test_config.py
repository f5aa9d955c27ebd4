"""The configuration file: a good one compiles; a bad one is refused with file:line, field path and fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from byzguard import config as guard_config
from byzguard.errors import ConfigError, KeyRingError, RuleCompileError
from byzguard.verdict import Code, Severity

REPO = Path(__file__).parents[2]


def test_shipped_example_is_valid() -> None:
    """byzguard.yaml, the documented example, compiles with its secrets in the environment."""
    cfg = guard_config.load(REPO / "byzguard.yaml", environ={"BYZGUARD_KEY_PRICING_1": "x"})
    assert [r.name for r in cfg.routes] == ["prices", "orders"]
    assert cfg.route_for("payments").name == "orders"


def test_error_names_file_line_and_field(tmp_path: Path) -> None:
    """A bad duration is refused with the file, its line and the dotted path to the field."""
    path = tmp_path / "bad.yaml"
    path.write_text("routes:\n  - name: r\n    inputs: [a]\n    verified_topic: b\n    quarantine_topic: c\n"
                    "    types:\n      t:\n        max_age: one day\n")
    with pytest.raises(ConfigError) as err:
        guard_config.load(path)
    message = str(err.value)
    assert f"{path}:8:" in message
    assert "routes.0.types.t.max_age" in message
    assert "not a duration" in message


@pytest.mark.parametrize("snippet, fault", [
    ("    policy: sometimes\n", "policy"),
    ("    types: {t: {checks: {integrity: maybe}}}\n", "checks.integrity"),
    ("    types: {t: {checks: {spelling: reject}}}\n", "unknown check"),
    ("    types: {t: {codes: {version.oops: warn}}}\n", "unknown code"),
    ("    surprise: 1\n", "Extra inputs are not permitted"),
    ("    types: {t: {key_ids: [nokey]}}\n", "not declared under keys"),
])
def test_invalid_fields_are_refused(snippet: str, fault: str) -> None:
    """Unknown or ill-typed fields are refused, not ignored."""
    text = "routes:\n  - name: r\n    inputs: [a]\n    verified_topic: b\n    quarantine_topic: c\n" + snippet
    with pytest.raises(ConfigError, match=fault):
        guard_config.loads(text)


def test_same_input_in_two_routes_is_refused() -> None:
    """An input topic belongs to exactly one route."""
    text = ("routes:\n  - {name: a, inputs: [x], verified_topic: v1, quarantine_topic: q1, types: {t: {}}}\n"
            "  - {name: b, inputs: [x], verified_topic: v2, quarantine_topic: q2, types: {t: {}}}\n")
    with pytest.raises(ConfigError, match="input topic 'x'"):
        guard_config.loads(text)


def test_rule_that_does_not_compile_is_refused_at_start() -> None:
    """A CEL syntax error stops the configuration from loading and names the rule."""
    text = ("routes:\n  - name: r\n    inputs: [a]\n    verified_topic: b\n    quarantine_topic: c\n"
            "    types: {t: {rules: [{name: broken, expr: 'data.price >> 1'}]}}\n")
    with pytest.raises(RuleCompileError, match="broken"):
        guard_config.loads(text)


def test_missing_secret_is_refused() -> None:
    """A key whose environment variable is unset stops the start with the variable's name."""
    text = ("keys: {k: {source: s, secret_env: NOPE_NOT_SET}}\nroutes:\n"
            "  - {name: r, inputs: [a], verified_topic: b, quarantine_topic: c, types: {t: {}}}\n")
    with pytest.raises(KeyRingError, match="NOPE_NOT_SET"):
        guard_config.loads(text, environ={})


def test_secret_in_config_is_not_accepted() -> None:
    """A key must point at a secret; writing the secret itself is refused."""
    text = ("keys: {k: {source: s, secret: hunter2}}\nroutes:\n"
            "  - {name: r, inputs: [a], verified_topic: b, quarantine_topic: c, types: {t: {}}}\n")
    with pytest.raises(ConfigError, match="secret"):
        guard_config.loads(text, environ={})


def test_severity_layers() -> None:
    """Code overrides beat check severities, which beat defaults; version.gap warns by default; off is off."""
    text = ("defaults: {checks: {time: warn}, codes: {time.future: off}}\nroutes:\n"
            "  - name: r\n    inputs: [a]\n    verified_topic: b\n    quarantine_topic: c\n"
            "    types: {t: {checks: {version: off}}}\n")
    cfg = guard_config.loads(text)
    policy = cfg.routes[0].policy_for("t")
    assert policy.level(Code.TIME_STALE) is Severity.WARN
    assert policy.level(Code.TIME_FUTURE) is Severity.OFF
    assert policy.level(Code.VERSION_REGRESSION) is Severity.OFF
    fallback = cfg.routes[0].policy_for("other")
    assert fallback.level(Code.VERSION_GAP) is Severity.WARN
    assert fallback.level(Code.VERSION_REGRESSION) is Severity.REJECT


@pytest.mark.parametrize("text, seconds", [("500ms", 0.5), ("30s", 30), ("10m", 600), ("24h", 86400),
                                           ("7d", 604800), (12, 12.0)])
def test_durations(text: object, seconds: float) -> None:
    """Durations accept ms, s, m, h, d and plain seconds."""
    assert guard_config.parse_duration(text) == seconds


# --------------------------------------------------------------------------- repeated keys in the file

ROUTE = "  - {name: r, inputs: [a], verified_topic: b, quarantine_topic: c, types: {t: {}}}\n"


@pytest.mark.parametrize("text, line, key", [
    ("routes:\n" + ROUTE + "idempotency: {window: 1h}\nroutes:\n" + ROUTE.replace("[a]", "[z]"), 4, "routes"),
    ("routes:\n  - name: r\n    inputs: [a]\n    verified_topic: b\n    quarantine_topic: c\n"
     "    types:\n      t: {}\n    inputs: [other]\n", 8, "inputs"),
    ("routes:\n  - name: r\n    inputs: [a]\n    verified_topic: b\n    quarantine_topic: c\n"
     "    types:\n      t:\n        max_age: 1h\n        sources: [s]\n        max_age: 1d\n", 10, "max_age"),
    ("routes:\n" + ROUTE.replace("{t: {}}", "{t: {}, t: {sources: [x]}}"), 2, "t"),
])
def test_repeated_key_is_refused_with_its_line(text: str, line: int, key: str) -> None:
    """A key written twice in one mapping, at any level (a second `routes:` would replace the first and leave
    its topics unguarded), is refused with the line of the repeat and of the first."""
    with pytest.raises(ConfigError) as err:
        guard_config.loads(text, source_path="byzguard.yaml")
    assert f"byzguard.yaml:{line}: duplicate key {key!r}" in str(err.value)


def test_merge_keys_may_be_overridden() -> None:
    """YAML anchors with `<<:` merges are not repeats: the mapping's own key overrides the merged one."""
    text = ("defaults: &d {max_age: 1h}\nroutes:\n  - {name: r, inputs: [a], verified_topic: b, quarantine_topic: c,"
            " types: {t: {<<: *d, max_age: 2h}}}\n")
    assert guard_config.loads(text).routes[0].types["t"].max_age == 7200.0


def test_config_check_refuses_a_second_routes_block(tmp_path: Path) -> None:
    """The shipped file with a second `routes:` appended fails `byzguard config check` naming the line."""
    from typer.testing import CliRunner

    from app.cli import cli
    repo = Path(__file__).resolve().parents[2]
    path = tmp_path / "byzguard.yaml"
    shipped = (repo / "byzguard.yaml").read_text()
    path.write_text(shipped + "\nroutes:\n" + ROUTE)
    result = CliRunner().invoke(cli, ["config", "check", str(path)],
                                env={"BYZGUARD_KEY_PRICING_1": "s", "COLUMNS": "400"})
    assert result.exit_code == 2
    assert f"{path}:{shipped.count(chr(10)) + 2}: duplicate key 'routes'" in result.output


def test_rule_errors_carry_the_line_of_the_rule(tmp_path: Path) -> None:
    """A rule that does not compile is reported at its own file:line, in a type's rules and in the defaults."""
    config = tmp_path / "byzguard.yaml"
    config.write_text("routes:\n  - name: r\n    inputs: [a]\n    verified_topic: b\n    quarantine_topic: c\n"
                      "    types:\n      t:\n        rules:\n          - {name: fine, expr: 'data.price > 0'}\n"
                      "          - name: broken\n            expr: 'data.price >> 1'\n")
    with pytest.raises(RuleCompileError, match=rf"^{config}:11: routes\.0\.types\.t\.rules\.1\.expr: .*broken"):
        guard_config.load(config)
    config.write_text("defaults:\n  rules:\n    - {name: nope, expr: 'unknown_thing > 1'}\n"
                      "routes:\n  - {name: r, inputs: [a], verified_topic: b, quarantine_topic: c, types: {t: {}}}\n")
    with pytest.raises(RuleCompileError, match=rf"^{config}:3: defaults\.rules\.0\.expr: .*nope"):
        guard_config.load(config)


def test_undeclared_key_id_is_reported_at_its_line(tmp_path: Path) -> None:
    """A key id no `keys:` entry declares is reported at the line that names it, not at line 1."""
    config = tmp_path / "byzguard.yaml"
    config.write_text("routes:\n  - name: r\n    inputs: [a]\n    verified_topic: b\n    quarantine_topic: c\n"
                      "    types:\n      t:\n        key_ids:\n          - k1\n")
    with pytest.raises(ConfigError, match=rf"{config}:9: routes\.0\.types\.t\.key_ids\.0: .*'k1' is not declared"):
        guard_config.load(config)


def test_loading_without_secrets_leaves_unavailable_keys_out() -> None:
    """require_secrets=False loads a configuration whose key secrets are not set here, without those keys."""
    text = ("keys: {k: {source: s, secret_env: NOPE_NOT_SET}, j: {source: t, secret_env: SET_HERE}}\nroutes:\n"
            "  - {name: r, inputs: [a], verified_topic: b, quarantine_topic: c, types: {t: {}}}\n")
    cfg = guard_config.loads(text, environ={"SET_HERE": "x"}, require_secrets=False)
    assert "k" not in cfg.keyring and "j" in cfg.keyring


@pytest.mark.parametrize("buffer", [False, True])
def test_route_holds_is_its_causal_buffer(tmp_path: Path, buffer: bool) -> None:
    """Route.holds (what the guard reads per record) is causal.buffer, also on a route copied with another causal."""
    import dataclasses

    from bench import events as bench_events

    path = bench_events.write_config(tmp_path / "c.yaml", repo=REPO, input_topic="in", verified="out", quarantine="q",
                                     partitions=1, causal_buffer=buffer)
    route = guard_config.load(path, environ=bench_events.secret_env()).routes[0]
    assert route.causal.buffer is buffer and route.holds is buffer
    flipped = dataclasses.replace(route, causal=route.causal.model_copy(update={"buffer": not buffer}))
    assert flipped.holds is (not buffer)
