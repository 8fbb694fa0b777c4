"""Settings: defaults, errors that name file and key, and the generated files in sync."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from harness import REPO

from sandboxd.config import ConfigError, load, parse
from sandboxd.tools import settings_doc


def errors_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(data, "/etc/sandboxd/sandboxd.yaml")
    return e.value.errors


def test_empty_config_is_the_defaults() -> None:
    cfg = parse({})
    assert cfg.daemon.workers == 8 and cfg.limits.memory == 256 << 20 and cfg.jail.run_uids == (880000, 1024)


def test_shipped_file_and_man_page_match_the_declarations() -> None:
    assert settings_doc.main(["--check", f"{REPO}/etc/sandboxd/sandboxd.yaml", f"{REPO}/man/sandboxd.yaml.5",
                              f"{REPO}/man/sandboxd-http.8"]) == 0
    cfg = load(f"{REPO}/etc/sandboxd/sandboxd.yaml")
    defaults = parse({})
    for section in ("root", "jail", "pool", "limits", "profiles", "runtimes", "network"):
        assert getattr(cfg, section) == getattr(defaults, section), section
    # A slim conffile: no path of one Python release, nothing but sandboxd-http's profile (sandboxd-http(8)):
    # the daemon's frame and request budget its max_body needs, and the quota every Dify request shares.
    text = Path(REPO, "etc", "sandboxd", "sandboxd.yaml").read_text(encoding="utf-8")
    assert "python3.1" not in text and len([ln for ln in text.splitlines() if ln and not ln.startswith("#")]) < 10
    assert cfg.daemon == dataclasses.replace(defaults.daemon, max_frame=32 << 20, buffer_budget_per_uid=160 << 20)
    assert (cfg.quotas.default, cfg.quotas.groups, cfg.quotas.deny_unlisted) == (
        defaults.quotas.default, defaults.quotas.groups, defaults.quotas.deny_unlisted)
    assert cfg.quotas.users == {"sandboxd-http": {
        "concurrent": 6, "queued": 64, "runs_per_minute": 6000, "cpu_seconds_per_hour": 0.0, "max_timeout": 60.0,
        "max_memory": 1 << 30, "max_output": 8 << 20}}


def test_the_bridges_defaults_fit_the_shipped_profile_without_waiting() -> None:
    """sandboxd-http with nothing set but its key, against the shipped sandboxd.yaml: nothing it
    would refuse at start, and nothing that waits (its runs at once, their requests and answers
    within what the daemon holds for one uid)."""
    from sandboxd import quota
    from sandboxd.http import bounds
    from sandboxd.http.settings import Settings
    from sandboxd.peer import Identity

    cfg = load(f"{REPO}/etc/sandboxd/sandboxd.yaml")
    limits = quota.effective_limits(cfg.quotas, Identity(999, 999, 1, "sandboxd-http", (999,), ("sandboxd-http",)))
    assert limits is not None
    hello = {"quota": quota.limits_dict(limits), "daemon": quota.daemon_limits(cfg.daemon)}
    found = bounds.check(Settings(api_key="k"), "sandboxd-http", hello)
    assert (found.errors, found.warnings) == ([], [])
    # The same bridge with MAX_WORKERS=8, against a daemon on its defaults (a sandboxd.yaml kept from an older
    # release): its default max_body gets what a frame holds; 2 of 8 runs wait for a worker; 8 such bodies,
    # and 8 answers of 2 x 8M, do not fit one uid's budgets.  Given, that max_body keeps it from starting.
    older = {"quota": quota.limits_dict(limits), "daemon": quota.daemon_limits(parse({}).daemon)}
    tight = bounds.check(Settings(api_key="k", max_workers=8), "sandboxd-http", older)
    assert tight.errors == [] and tight.values["max_body"] == (16 << 20) - bounds.FRAME_SLACK
    assert ["(its default)" in tight.warnings[0] and "daemon.max_frame" in tight.warnings[0],
            "runs beyond 6" in tight.warnings[1], "buffer_budget_per_uid" in tight.warnings[2],
            "response_budget_per_uid" in tight.warnings[3]] == [True] * 4, tight.warnings
    given = bounds.check(Settings(api_key="k", given=frozenset({"max_body"})), "sandboxd-http", older)
    assert [e.split(" ")[0] for e in given.errors] == ["max_body"] and "daemon.max_frame" in given.errors[0]


def test_error_names_file_key_and_expected_form() -> None:
    with pytest.raises(ConfigError) as e:
        parse({"quotas": {"default": {"max_memory": "lots"}}}, "/etc/sandboxd/sandboxd.yaml")
    assert str(e.value) == ("/etc/sandboxd/sandboxd.yaml: quotas.default.max_memory: expected a size like 256M, "
                            "1G or a number of bytes, got 'lots'")


def test_every_problem_is_listed_with_suggestions() -> None:
    errs = errors_of({"daemon": {"wokers": 4, "queue_timeout": "soon", "socket": "relative.sock"},
                      "jail": {"run_uids": "5-1"}, "pool": {"min": 9, "max": 2}, "nonsense": {}})
    assert "daemon.wokers: unknown setting (did you mean workers?)" in errs
    assert "daemon.queue_timeout: expected a duration like 500ms, 5s or 2m, got 'soon'" in errs
    assert "daemon.socket: expected an absolute path, got 'relative.sock'" in errs
    assert any(e.startswith("jail.run_uids: expected a uid range") for e in errs)
    assert "pool.min: expected at most pool.max (2), got 9" in errs
    assert "nonsense: unknown section" in errs


def test_types_are_checked() -> None:
    errs = errors_of({"daemon": {"workers": "8", "self_test": "yes"}, "limits": {"pids": 1}})
    assert "daemon.workers: expected an integer from 1 to 4096, got '8'" in errs
    assert "daemon.self_test: expected true or false, got 'yes'" in errs
    assert "limits.pids: expected an integer from 2 to 100000, got 1" in errs


def test_warmup_must_be_python_that_compiles() -> None:
    errs = errors_of({"jail": {"warmup": "import numpy\nnumpy.linalg.det(("}})
    assert len(errs) == 1 and errs[0].startswith("jail.warmup: expected Python code that compiles (SyntaxError")
    assert parse({"jail": {"warmup": "import json\njson.dumps([1])\n"}}).jail.warmup.startswith("import json")


def test_uid_range_must_hold_workers_and_pools() -> None:
    errs = errors_of({"jail": {"run_uids": "900000-900009"}})
    assert any(e.startswith("jail.run_uids: expected at least") for e in errs)


def test_socket_mode_quoted_or_a_real_number(tmp_path: Path) -> None:
    assert parse({"daemon": {"socket_mode": "0660"}}).daemon.socket_mode == 0o660
    assert parse({"daemon": {"socket_mode": 0o660}}).daemon.socket_mode == 0o660
    for written in ('"0660"', "0660", "0o660"):  # quoted, or octal to YAML
        (tmp_path / "m.yaml").write_text(f"daemon: {{socket_mode: {written}}}\n")
        assert load(str(tmp_path / "m.yaml")).daemon.socket_mode == 0o660, written
    (tmp_path / "m.yaml").write_text("daemon:\n  socket_mode: 660\n")  # decimal 660 to YAML: refused, not guessed
    with pytest.raises(ConfigError) as e:
        load(str(tmp_path / "m.yaml"))
    assert str(e.value) == (f"{tmp_path}/m.yaml:2:3: daemon.socket_mode: 660 unquoted is the decimal number 660 "
                            'to YAML, not the octal mode it looks like: write "0660" (quoted)')


def test_quota_tables_and_profiles() -> None:
    cfg = parse({"quotas": {"users": {"1001": {"concurrent": 9}}, "groups": {"0": {"network": True}},
                            "deny_unlisted": True},
                 "profiles": {"python3": {"allow": ["flock"], "errno": {"statx": "ENOSYS"}}}})
    assert cfg.quotas.users["1001"] == {"concurrent": 9}
    assert cfg.quotas.groups["0"] == {"network": True} and cfg.quotas.deny_unlisted
    assert cfg.profiles["python3"].errno == {"statx": 38}
    errs = errors_of({"profiles": {"python3": {"allow": ["not_a_syscall"]}, "ruby": {}},
                      "quotas": {"users": {"alice": {"max_memory": -1}}}})
    assert "profiles.python3.allow: unknown system call(s) not_a_syscall" in errs
    assert "profiles.ruby: unknown language (known: python3, nodejs)" in errs
    assert "quotas.users.alice.max_memory: expected a size like 256M, 1G or a number of bytes, got -1" in errs


def test_root_python_must_be_inside_the_root() -> None:
    errs = errors_of({"root": {"python": "/opt/py/bin/python3"}})
    assert errs == ["root.python: /opt/py/bin/python3 is not under any of root.paths / root.extra_paths"]


def test_private_places_are_refused_as_root_paths() -> None:
    errs = errors_of({"root": {"extra_paths": ["/home/alice/venv/lib/python3.11/site-packages", "/opt/ok",
                                               "/tmp/../root/x", "/etc/sandboxd"]}})
    assert [e.split(",")[0] for e in errs] == [
        "root.extra_paths: /home/alice/venv/lib/python3.11/site-packages is under /home",
        "root.extra_paths: /tmp/../root/x is under /root",
        "root.extra_paths: /etc/sandboxd is under /etc/sandboxd"]


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("daemon: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(str(bad))
