"""Settings: one object with nested sections, built by :func:`load_settings` and passed down.

Precedence, highest first: CLI flags / keyword arguments > environment (``EDGE_VLM_...``,
nested with ``__``, e.g. ``EDGE_VLM_RUNTIME__THREADS=4``) > a TOML file (``EDGE_VLM_CONFIG``
or ``config.toml`` in the platform config dir) > defaults. No settings object is created at
import time.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from edge_vlm.errors import ConfigError

APP_NAME = "edge-vlm"
ENV_PREFIX = "EDGE_VLM_"
NON_SETTING_VARS = frozenset({"EDGE_VLM_HOME", "EDGE_VLM_CONFIG"})
"""``EDGE_VLM_*`` variables that are not settings (read by :func:`data_dir` and
:func:`default_config_file`); every other one must name a setting."""

_toml_file: ContextVar[Path | None] = ContextVar("edge_vlm_toml_file", default=None)


class _Section(BaseModel):
    """A settings section: an unknown key is an error (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Section):
    """Which model to load."""

    default: str = "default"
    """Model used when none is named: a store name, a GGUF path, or ``default`` (shipped)."""
    mmproj: str | None = None
    """mmproj GGUF for a model given as a path (store models know their own)."""


class RuntimeSettings(_Section):
    """llama.cpp context and hardware."""

    n_ctx: int | None = Field(default=None, ge=64)
    """Context window in tokens; None: the model's training context, at most 8192."""
    n_batch: int = Field(default=512, ge=8)
    """Prompt tokens evaluated per llama.cpp batch."""
    threads: int | None = Field(default=None, ge=1)
    """CPU threads, used as given. None: follow the machine's load, from one thread up to
    one per physical core, re-chosen during each request (:mod:`edge_vlm.cpuload`)."""
    gpu: Literal["auto", "on", "off"] = "auto"
    """Offload to the GPU: ``auto`` when the llama.cpp build supports offload."""
    n_gpu_layers: int = -1
    """Layers to offload when the GPU is used; -1: all."""
    mmproj_on_gpu: bool = True
    """Run the vision encoder on the GPU when offload is used."""
    flash_attn: Literal["auto", "on", "off"] = "auto"
    """Flash attention for the language model and the vision encoder (``auto``: llama.cpp
    enables it where the backend supports it, as llama-mtmd-cli does)."""
    swa_full: bool = False
    """Keep a full-size KV cache for sliding-window attention layers (Gemma 3). Off, as in
    llama.cpp's tools: those layers keep only the window (about 0.75 GB less for Gemma 3 4B
    at 8192 tokens), and a conversation whose reusable prefix reaches back past the window
    is evaluated again. On: any prefix can be reused, at the memory of a full cache."""
    verbose: bool = False
    """Show llama.cpp's own log lines on stderr."""


class ImageSettings(_Section):
    """How images are read."""

    allow_remote: bool = False
    """Fetch ``http(s)`` image URLs. Off: edge-vlm never touches the network by itself."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """Hosts allowed even when they resolve to loopback or private addresses."""
    allow_local_files: bool = True
    """Accept local paths and ``file://`` URLs (CLI and Python API)."""
    max_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    """Largest image file or data URL payload, in bytes."""
    max_pixels: int = Field(default=50_000_000, ge=1)
    """Largest image, in pixels, checked from the header before decoding."""
    max_side: int | None = Field(default=None, ge=1)
    """Downscale images so their longest side is at most this (None: the model's need)."""
    detail: Literal["auto", "low", "high"] = "auto"
    """Default detail when a request does not say: ``low`` one tile, ``high`` the model's
    full tiling, ``auto`` the budget below (tiling projectors such as SmolVLM's only)."""
    max_image_tokens: int | None = Field(default=None, ge=1)
    """Image-token budget per image for ``auto`` (None: one tile on a CPU, full on a GPU)."""
    max_tiles: int | None = Field(default=None, ge=1)
    """Most tiles per image for ``auto`` (tokens = tiles x tokens per tile)."""


class SamplingSettings(_Section):
    """Defaults for requests that do not set these fields."""

    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """0: greedy, reproducible answers."""
    top_p: float = Field(default=0.95, ge=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, ge=0.0)
    max_tokens: int = Field(default=512, ge=1)


class LimitSettings(_Section):
    """Bounds on one request, checked before the chat template runs (413 beyond)."""

    max_messages: int = Field(default=4096, ge=1)
    """Most messages in one conversation."""
    max_text_chars: int = Field(default=1_000_000, ge=1)
    """Most characters of message text in one conversation, all messages together."""


class CacheSettings(_Section):
    """Reuse of earlier work."""

    prefix_reuse: bool = True
    """Keep the KV cache between requests and evaluate only the new suffix."""
    embedding_cache_mb: int = Field(default=256, ge=0)
    """In-memory LRU of vision-encoder outputs, in MiB (0: off)."""
    disk_cache_mb: int = Field(default=0, ge=0)
    """On-disk cache of vision-encoder outputs, in MiB (0: off). Entries are validated on
    read; a corrupt one is discarded."""
    disk_cache_dir: str | None = None
    """Folder of the on-disk cache (None: ``embeddings`` in the platform cache dir)."""
    kv_ram_mb: int = Field(default=256, ge=0)
    """Recent conversations' KV-cache states kept in memory, in MiB (0: off): coming back
    to one restores its state instead of evaluating its prompt again."""


class ServerSettings(_Section):
    """``edge-vlm serve``: the local chat-completion API."""

    host: str = "127.0.0.1"
    """Address to bind. Anything but loopback requires a token."""
    port: int = Field(default=8080, ge=0, le=65535)
    """Port to listen on (0: any free port; the startup line tells which)."""
    token: str | None = None
    """Bearer token clients must send; None on loopback: auth off."""
    require_token: bool = False
    """Require a Bearer token even on loopback; with no ``token`` set, one is generated on
    first use and stored in ``token_file`` (readable by you only)."""
    token_file: str | None = None
    """Where the generated token is kept (None: ``server-token`` in the config dir)."""
    allowed_host_names: list[str] = Field(default_factory=list)
    """Extra names accepted in the ``Host`` header besides the bound address and localhost
    (names this machine is reached by); anything else is refused (DNS rebinding)."""
    cors_origins: list[str] = Field(default_factory=list)
    """Origins allowed by CORS (empty: CORS off)."""
    allowed_local_media_path: str | None = None
    """Folder under which ``file://`` image URLs and paths are allowed (None: refused)."""
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    """Largest request body, counted while reading (413 beyond)."""
    max_images_per_request: int = Field(default=8, ge=0)
    """Most images in one request, over all its messages."""
    max_tokens_limit: int = Field(default=4096, ge=1)
    """Largest ``max_tokens`` a request may ask for."""
    queue_size: int = Field(default=8, ge=1)
    """Requests waiting per loaded model before new ones get 503."""
    request_timeout_s: float = Field(default=300.0, gt=0)
    """Longest a request may take, waiting in the queue included."""
    read_timeout_s: float = Field(default=30.0, gt=0)
    """Longest a client may take to send its request headers and body (408 beyond)."""
    max_connections: int = Field(default=1000, ge=1)
    """Connections (and requests) open at once; beyond, new requests get 503."""
    keep_alive_s: float = Field(default=5.0, gt=0)
    """How long an idle kept-alive connection stays open."""
    max_json_depth: int = Field(default=32, ge=4)
    """Deepest nesting of arrays and objects accepted in a request body."""
    response_cache_entries: int = Field(default=256, ge=0)
    """Deterministic responses kept for ``x-use-cache`` (0: off)."""
    wait_for_model_timeout_s: float = Field(default=120.0, gt=0)
    """Longest a request with ``x-wait-for-model: true`` waits for its model to load."""
    max_loaded_models: int = Field(default=1, ge=1)
    """Models kept loaded at once; loading another unloads the least recently used idle one."""
    preload: bool = True
    """Start loading the default model when the server starts (else on first request)."""


class TuiSettings(_Section):
    """``edge-vlm chat``: the terminal app."""

    theme: str = "textual-dark"
    show_stats: bool = True
    """Show timing stats under each answer."""
    system_prompt: str = ""
    """System prompt of new conversations (empty: none); change it in the app with /system."""
    thumbnails: Literal["auto", "sixel", "kitty", "halfcell", "unicode", "off"] = "auto"
    """How image thumbnails are drawn: ``auto`` picks Sixel or Kitty graphics where the
    terminal supports them and coloured half-blocks otherwise."""
    thumbnail_height: int = Field(default=6, ge=2, le=40)
    """Thumbnail height in terminal rows."""


class StoreSettings(_Section):
    """The model store (under ``EDGE_VLM_HOME`` or the platform data dir)."""

    verify_on_load: bool = False
    """Re-hash model files before every load (slow for large files)."""
    check_load: bool = True
    """Load a new model pair once in a child process before installing or first using it,
    so a llama.cpp crash on a bad file is reported instead of killing edge-vlm."""
    check_load_timeout_s: float = Field(default=600.0, gt=0)
    """Longest that child-process load check may take before the file is refused."""
    catalog_file: str | None = None
    """An extra catalog TOML (same format as ``models/catalog.toml``) whose entries add to
    or replace the shipped ones, e.g. pointing at an internal mirror."""


class Settings(BaseSettings):
    """All of edge-vlm's settings."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    model: ModelSettings = Field(default_factory=ModelSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    tui: TuiSettings = Field(default_factory=TuiSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = _toml_file.get()
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    def with_overrides(self, overrides: Mapping[str, Any] | None = None, *,
                       source: str = "the arguments") -> Settings:
        """A copy with some settings replaced (the settings themselves are not changed).

        This is the one way every front end applies what its caller said (keyword
        arguments of :func:`edge_vlm.load`, command-line flags) on top of settings it was
        given. Neither the environment nor the settings file is read again.

        Args:
            overrides: Dotted keys (``{"runtime.threads": 4}``) or nested dicts. ``None``
                means "not given" and keeps the current value; ``False`` and ``0`` are
                values like any other.
            source: Where the overrides came from, for error messages.

        Raises:
            ConfigError: an unknown key (naming it and the closest valid one) or an
                invalid value (naming the key and the value).
        """
        nested = _nest(dict(overrides or {}))
        if not nested:
            return self
        data = _merge(self.model_dump(), nested)
        try:
            # model_validate, not the constructor: the constructor would read the
            # environment and the file again, under values the caller already chose.
            return type(self).model_validate(data)
        except ValidationError as err:
            raise _config_error(err, lambda key: source) from None


@dataclass
class SettingsOrigin:
    """Where the effective settings came from (shown by ``edge-vlm info``)."""

    config_file: Path | None
    config_file_exists: bool
    env_vars: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)


def cache_dir() -> Path:
    """The platform cache directory (``~/.cache/edge-vlm`` on Linux)."""
    return Path(platformdirs.user_cache_dir(APP_NAME))


def config_dir() -> Path:
    """The platform config directory (``~/.config/edge-vlm`` on Linux)."""
    return Path(platformdirs.user_config_dir(APP_NAME))


def data_dir() -> Path:
    """Where models and conversations live: ``EDGE_VLM_HOME`` or the platform data dir."""
    home = os.environ.get("EDGE_VLM_HOME")
    return Path(home).expanduser() if home else Path(platformdirs.user_data_dir(APP_NAME))


def default_config_file() -> Path:
    """``EDGE_VLM_CONFIG`` or ``config.toml`` in :func:`config_dir`."""
    env = os.environ.get("EDGE_VLM_CONFIG")
    return Path(env).expanduser() if env else config_dir() / "config.toml"


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """Turn ``{"runtime.threads": 4}`` into ``{"runtime": {"threads": 4}}``; drop Nones."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        parts = key.split(".")
        cur = nested
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        if isinstance(value, Mapping) and isinstance(cur.get(parts[-1]), dict):
            cur[parts[-1]] = _merge(cur[parts[-1]], _nest(dict(value)))
        else:
            cur[parts[-1]] = _nest(dict(value)) if isinstance(value, Mapping) else value
    return nested


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` laid over ``base``, section by section."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def setting_keys() -> list[str]:
    """Every setting's dotted name (``runtime.threads``, ...)."""
    return [f"{section}.{name}"
            for section, info in Settings.model_fields.items()
            for name in (info.annotation.model_fields if isinstance(info.annotation, type)
                         and issubclass(info.annotation, BaseModel) else {})]


def env_var(key: str) -> str:
    """The environment variable of a dotted setting name (``EDGE_VLM_RUNTIME__THREADS``)."""
    return ENV_PREFIX + key.upper().replace(".", "__")


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _in_nested(data: Any, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _config_error(err: ValidationError, where: Callable[[str], str]) -> ConfigError:
    """One message for the first problem: the key, what is wrong, where it came from."""
    first = err.errors(include_url=False)[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        names = setting_keys() if "." in key else list(Settings.model_fields)
        return ConfigError(
            f"unknown setting '{key}' in {where(key)}{_did_you_mean(key, names)}; "
            "`edge-vlm info` lists every setting")
    return ConfigError(
        f"setting '{key}': {first['msg']} (got {first.get('input')!r}) in {where(key)}")


def _check_environment() -> None:
    """Refuse an ``EDGE_VLM_*`` variable that names no setting.

    pydantic-settings ignores a variable whose first part is no section
    (``EDGE_VLM_THREADS``); unknown keys inside a section are refused by the section.
    """
    known = [env_var(k) for k in setting_keys()]
    sections = {name.upper() for name in Settings.model_fields}
    for name in sorted(os.environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NON_SETTING_VARS:
            continue
        if upper.removeprefix(ENV_PREFIX).split("__")[0] not in sections:
            hint = _did_you_mean(upper, known + sorted(NON_SETTING_VARS))
            raise ConfigError(
                f"unknown setting variable {name} in the environment{hint}; unset it, or "
                "see `edge-vlm info` for every setting (variables are "
                "EDGE_VLM_<SECTION>__<KEY>)")


def load_settings(
    overrides: dict[str, Any] | None = None, *, config_file: Path | None = None
) -> Settings:
    """Build the settings from defaults, the TOML file, the environment and overrides.

    Args:
        overrides: Highest-precedence values (CLI flags), as dotted keys
            (``{"runtime.threads": 4}``) or nested dicts; None values are ignored, as in
            :meth:`Settings.with_overrides`.
        config_file: The TOML file to read instead of :func:`default_config_file`.

    Raises:
        ConfigError: naming the invalid or unknown setting and where it came from.
    """
    path = config_file or default_config_file()
    _check_environment()
    token = _toml_file.set(path if path.is_file() else None)
    try:
        settings = Settings()
    except ValidationError as err:
        raise _config_error(err, lambda key: _origin(key, path)) from None
    except (OSError, ValueError) as err:  # a TOML syntax error surfaces as ValueError
        raise ConfigError(f"cannot read settings file {path}: {err}") from None
    finally:
        _toml_file.reset(token)
    return settings.with_overrides(overrides, source="the command-line flags or arguments")


def _origin(key: str, path: Path) -> str:
    """Where a setting's value came from: a variable or the file."""
    wanted = env_var(key)
    for name in os.environ:
        if name.upper() == wanted or (name.upper().startswith(wanted + "__")):
            return f"the environment variable {name}"
    section = env_var(key.split(".")[0])
    for name in os.environ:
        if name.upper() == section:
            return f"the environment variable {name}"
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        if _in_nested(data, key):
            return f"the settings file {path}"
    return f"the settings file {path} or the environment"


def settings_origin(overrides: dict[str, Any] | None = None) -> SettingsOrigin:
    """Describe which file, environment variables and flags the settings came from."""
    path = default_config_file()
    env = sorted(k for k in os.environ if k.startswith(ENV_PREFIX))
    return SettingsOrigin(
        config_file=path,
        config_file_exists=path.is_file(),
        env_vars=env,
        overrides=sorted(k for k, v in (overrides or {}).items() if v is not None),
    )
