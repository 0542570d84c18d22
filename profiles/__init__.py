"""Device profiles (data only, one TOML file per device) and their schema."""
from deploy.profiles.schema import (
    Profile,
    Resolved,
    builtin_names,
    builtin_profiles,
    load_builtin,
    load_profile_file,
    local_cpu_flags,
    parse_profile,
    resolve_target,
)

__all__ = [
    "Profile", "Resolved", "builtin_names", "builtin_profiles", "load_builtin", "load_profile_file",
    "local_cpu_flags", "parse_profile", "resolve_target",
]
