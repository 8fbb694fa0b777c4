"""What no single setting can say alone: paths, uids, pools, profiles and the network policy,
checked against each other and against this host."""

from __future__ import annotations

import grp
import os
import pwd

from ..jail.spec.sections import SCRATCH_PATHS, forbidden_prefix, under
from .sections import Config


def environments_dir(cfg: Config, state_dir: str | None = None) -> str:
    """Where built environments live (daemon.environments_dir, else under the state directory)."""
    return cfg.daemon.environments_dir or os.path.join(state_dir or cfg.daemon.state_dir, "environments")


def environments_dir_problem(cfg: Config, state_dir: str | None = None) -> str | None:
    """Why environments could not live where they would (None when they can, or there are none).

    Their site-packages go into roots at the same path: never under a place no root holds (/tmp,
    /home, ...) or that a run's scratch space covers, links followed.  ``state_dir`` is the
    daemon's --state-dir, under which they go unless daemon.environments_dir says otherwise."""
    if not cfg.environments:
        return None
    where = environments_dir(cfg, state_dir)
    real = os.path.realpath(where)
    place = next((p for p in (os.path.normpath(where), real) if forbidden_prefix(p)), None)
    prefix = forbidden_prefix(place) if place else next(
        (p for p in SCRATCH_PATHS if under(os.path.normpath(where), p) or under(real, p)), None)
    if prefix is None:
        return None
    if cfg.daemon.environments_dir:
        source = "daemon.environments_dir"
    elif state_dir and state_dir != cfg.daemon.state_dir:
        source = f"--state-dir {state_dir} (environments go to {where})"
    else:
        source = f"daemon.state_dir {cfg.daemon.state_dir} (environments go to {where})"
    shown = where if where == real else f"{where} ({real})"
    return (f"{source}: {shown} is under {prefix}; environments go into roots at the same path, and nothing there "
            "ever does (or a run's scratch space covers it there): set daemon.environments_dir elsewhere, e.g. "
            "/var/lib/sandboxd/environments")


def cross_checks(cfg: Config, errors: list[str], warnings: list[str]) -> None:
    from ..jail.policy.seccomp import unknown_syscalls

    all_paths = (*cfg.root.paths, *cfg.root.extra_paths)
    for key, paths in (("root.paths", cfg.root.paths), ("root.extra_paths", cfg.root.extra_paths)):
        for p in paths:
            if prefix := forbidden_prefix(os.path.normpath(p)):
                errors.append(f"{key}: {p} is under {prefix}, which never goes into a root (users', the "
                              f"system's or the daemon's private files); put the libraries elsewhere, e.g. /opt")
    if not any(under(cfg.root.python, p) for p in all_paths):
        errors.append(f"root.python: {cfg.root.python} is not under any of root.paths / root.extra_paths")
    for p in cfg.root.python_path:
        inside = any(under(p, q) or under(q, p) for q in all_paths)
        if not inside:
            errors.append(f"root.python_path: {p} holds nothing of root.paths / root.extra_paths")
    if cfg.pool.min > cfg.pool.max:
        errors.append(f"pool.min: expected at most pool.max ({cfg.pool.max}), got {cfg.pool.min}")
    first, count = cfg.jail.run_uids
    pooled = sum(rt.pool_max if rt.pool_max >= 0 else cfg.pool.max for rt in cfg.runtimes.values() if rt.available)
    needed = cfg.daemon.workers + 2 * pooled + 2
    if count < needed:
        errors.append(f"jail.run_uids: expected at least {needed} uids (workers + 2 x the pooled workers of each "
                      f"runtime, +2), got {count}")
    for name, prof in cfg.profiles.items():
        for key, names in (("allow", prof.allow), ("deny", prof.deny), ("errno", tuple(prof.errno))):
            bad = unknown_syscalls(names)
            if bad:
                errors.append(f"profiles.{name}.{key}: unknown system call(s) {', '.join(bad)}")
    for table, entries in (("users", cfg.quotas.users), ("groups", cfg.quotas.groups)):
        for name in entries:
            if not name.isdigit() and not _exists(table, name):
                warnings.append(f"quotas.{table}.{name}: no such {table[:-1]} on this host (entry unused)")
    _network_checks(cfg, errors, warnings)
    _environment_checks(cfg, errors, warnings)
    if cfg.limits.timeout > cfg.quotas.default.max_timeout:
        warnings.append("limits.timeout is above quotas.default.max_timeout; runs get the quota's maximum")


def _environment_checks(cfg: Config, errors: list[str], warnings: list[str]) -> None:
    first, count = cfg.jail.run_uids
    if first <= cfg.jail.build_uid < first + count:
        errors.append(f"jail.build_uid: {cfg.jail.build_uid} is one of jail.run_uids: builds and runs must never "
                      "share a uid")
    if cfg.daemon.environments_dir and not cfg.daemon.environments_dir.startswith("/"):
        errors.append(f"daemon.environments_dir: expected an absolute path, got {cfg.daemon.environments_dir!r}")
    elif problem := environments_dir_problem(cfg):
        errors.append(problem)
    for table, entries in (("users", cfg.quotas.users), ("groups", cfg.quotas.groups), ("", {"default": {
            "environments": cfg.quotas.default.environments}})):
        for name, limits in entries.items():
            for env in limits.get("environments", ()):
                if env != "*" and env not in cfg.environments:
                    key = f"quotas.{table}.{name}" if table else "quotas.default"
                    warnings.append(f"{key}.environments: {env} is not one of environments (entry unused)")


def _network_checks(cfg: Config, errors: list[str], warnings: list[str]) -> None:
    import ipaddress

    from ..jail.net.netpolicy import Policy, proxy_refusal

    net = cfg.network
    pool = ipaddress.ip_network(net.pool)
    if pool.version != 4:
        errors.append(f"network.pool: expected an IPv4 network, got {net.pool}")
    elif pool.num_addresses // 4 < cfg.jail.run_uids[1]:
        errors.append(f"network.pool: {net.pool} has room for {pool.num_addresses // 4} runs (4 addresses each), "
                      f"fewer than jail.run_uids ({cfg.jail.run_uids[1]}); give it at least "
                      f"/{32 - (4 * cfg.jail.run_uids[1] - 1).bit_length()}")
    policy = Policy(net.allow, net.deny)
    for server in net.dns:
        if server != "host" and (why := policy.refusal(server)):
            errors.append(f"network.dns: runs may not reach {server} ({why}); add it to network.allow or use a "
                          "resolver they may reach")
    if net.proxy and (why := proxy_refusal(policy, net.proxy)):
        errors.append(f"network.proxy: runs may not reach {why}; add it to network.allow")


def _exists(table: str, name: str) -> bool:
    try:
        if table == "users":
            pwd.getpwnam(name)
        else:
            grp.getgrnam(name)
        return True
    except KeyError:
        return False


