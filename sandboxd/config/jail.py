"""The jail's settings as the configuration implies them: its sections, and the ceilings
every pooled worker starts with (the most any caller may ask for)."""

from __future__ import annotations

from ..jail.policy.seccomp import BUILTIN
from ..jail.spec.settings import JailSettings
from .sections import Config, all_quota_maxima


def jail_settings(cfg: Config, state_dir: str) -> JailSettings:
    maxima = all_quota_maxima(cfg.quotas)
    profiles = {lang: BUILTIN[lang].extended(lang, p.allow, p.deny, p.errno) for lang, p in cfg.profiles.items()
                if cfg.runtimes[lang].available}
    return JailSettings(state_dir=state_dir, root=cfg.root, jail=cfg.jail, pool=cfg.pool, limits=cfg.limits,
                        profiles=profiles,
                        max_memory=max(maxima.max_memory, cfg.limits.memory, maxima.max_session_memory),
                        max_cpu_ms=int(max(maxima.max_timeout, cfg.limits.timeout, maxima.max_session_lifetime) * 1000),
                        network=cfg.network, network_enabled=maxima.network,
                        runtimes={lang: rt for lang, rt in cfg.runtimes.items() if rt.available})
