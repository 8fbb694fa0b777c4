"""sandboxd.yaml: the daemon's and the jail's settings, declared once, read with errors that
name the file, key and expected form (``load``), and what the jail makes of them
(``jail_settings``).

    sections   the daemon's own sections, quotas, environments; ``Config``, the whole file
    load       parse and load: every section, runtimes, profiles, the file's errors located
    checks     what settings say together, checked against each other and this host
    jail       the jail's settings (``JailSettings``) as the configuration implies them
"""

from ..jail.spec.runtimes import ALIASES, LANGUAGES, RUNTIME_DEFAULTS
from ..jail.spec.sections import (
    DEFAULT_ROOT_EXCLUDE,
    DEFAULT_ROOT_PATHS,
    JailConfig,
    LimitsSettings,
    NetworkSettings,
    PoolSettings,
    ProfileSettings,
    RootSettings,
    RuntimeSettings,
)
from .checks import environments_dir, environments_dir_problem
from .jail import jail_settings
from .load import ConfigError, load, parse
from .sections import (
    DEFAULT_CONFIG,
    SECTIONS,
    Config,
    DaemonSettings,
    EnvironmentSettings,
    QuotaLimits,
    QuotaPolicy,
    all_quota_maxima,
)

__all__ = [
    "ALIASES", "DEFAULT_CONFIG", "DEFAULT_ROOT_EXCLUDE", "DEFAULT_ROOT_PATHS", "LANGUAGES", "RUNTIME_DEFAULTS",
    "SECTIONS", "Config", "ConfigError", "DaemonSettings", "EnvironmentSettings", "JailConfig", "LimitsSettings",
    "NetworkSettings", "PoolSettings", "ProfileSettings", "QuotaLimits", "QuotaPolicy", "RootSettings",
    "RuntimeSettings", "all_quota_maxima", "environments_dir", "environments_dir_problem", "jail_settings", "load",
    "parse",
]
