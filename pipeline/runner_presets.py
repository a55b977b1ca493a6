"""Runner presets: ``configs/runners/<name>.yaml`` -> Beam flags and curate overrides.

A preset holds ``pipeline_options`` (Beam flags: ``runner``, ``job_endpoint``,
``sdk_container_image``, ...) and ``set`` (curate config overrides such as
``model.device: cuda``). ``capgap curate --runner_preset NAME`` puts its flags first, so
flags given on the command line win.

    flags, overrides = preset_flags("portable")   # or a path to a YAML file
"""

from __future__ import annotations

from capgap.core.config import ConfigError, read_yaml, resolve_config_path


def preset_flags(name_or_path: str) -> tuple[list[str], list[str]]:
    """(Beam flags, curate overrides) from a runner preset YAML."""
    path = resolve_config_path(
        name_or_path if name_or_path.endswith(".yaml") else f"runners/{name_or_path}"
    )
    data = read_yaml(path)
    unknown = set(data) - {"pipeline_options", "set"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (use pipeline_options, set)")
    flags: list[str] = []
    for key, value in (data.get("pipeline_options") or {}).items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if item is True:
                flags.append(f"--{key}")
            elif item is False or item is None:
                continue
            else:
                flags.append(f"--{key}={item}")
    overrides = [f"{k}={v}" for k, v in (data.get("set") or {}).items()]
    return flags, overrides
