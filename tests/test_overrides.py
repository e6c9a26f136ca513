"""Nothing the caller says is dropped: load() overrides with falsy values, chat() keywords,
unknown settings keys in the file, the environment and the flags, and settings.store.*
reaching the store (real tiny model, real llama.cpp)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

import edge_vlm
from edge_vlm.api import VLM
from edge_vlm.config import Settings, load_settings
from edge_vlm.errors import ConfigError, ModelNotFoundError, RequestError, StoreError
from edge_vlm.schema import ChatCompletionRequest
from tests.conftest import ask

# -- edge_vlm.load(settings=..., <override>=<falsy>) ---------------------------------------

TRUTHY = Settings.model_validate({}).with_overrides({  # no environment read
    "images.allow_remote": True, "runtime.verbose": True, "runtime.gpu": "on",
    "runtime.flash_attn": "on", "runtime.threads": 3, "runtime.n_ctx": 512})


@pytest.mark.parametrize(("keyword", "value", "read"), [
    ("allow_remote_images", False, lambda s: s.images.allow_remote),
    ("verbose", False, lambda s: s.runtime.verbose),
    ("gpu", "off", lambda s: s.runtime.gpu),
    ("flash_attn", "off", lambda s: s.runtime.flash_attn),
    ("threads", 1, lambda s: s.runtime.threads),
    ("n_ctx", 256, lambda s: s.runtime.n_ctx),
])
def test_every_load_keyword_beats_the_settings_given(home, tiny_paths, keyword, value, read):
    base = TRUTHY.with_overrides({"runtime.gpu": "off", "runtime.verbose": False}
                                 if keyword not in ("gpu", "verbose") else {})
    with edge_vlm.load(tiny_paths.model, tiny_paths.mmproj, settings=base,
                       **{keyword: value}) as vlm:
        assert read(vlm.settings) == value
        assert read(base) != value  # the settings passed in are not changed


def test_remote_images_stay_refused_when_the_caller_says_false(home, tiny_paths):
    with edge_vlm.load(tiny_paths.model, tiny_paths.mmproj, threads=1, gpu="off",
                       settings=TRUTHY.with_overrides({"runtime.gpu": "off"}),
                       allow_remote_images=False) as vlm:
        assert vlm.image_policy().allow_remote is False
        with pytest.raises(RequestError, match="remote"):
            vlm.chat(ask("http://example.com/a.png"), max_tokens=1)


@pytest.mark.parametrize(("keyword", "key"), [("threads", "runtime.threads"),
                                              ("n_ctx", "runtime.n_ctx")])
def test_a_zero_is_refused_not_ignored(home, tiny_paths, keyword, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        edge_vlm.load(tiny_paths.model, tiny_paths.mmproj, **{keyword: 0})


# -- chat(): explicit request keywords, unknown ones refused -------------------------------


def test_chat_has_a_keyword_for_every_request_field():
    params = inspect.signature(VLM.chat).parameters
    missing = set(ChatCompletionRequest.model_fields) - set(params) - {"messages"}
    assert not missing, f"add these request fields to VLM.chat: {sorted(missing)}"


def test_misspelt_keyword_is_refused_with_the_closest_name(tiny_vlm, images):
    with pytest.raises(RequestError, match=r"max_token: .*did you mean 'max_tokens'"):
        tiny_vlm.chat(ask(images["red"]), max_token=5)
    with pytest.raises(RequestError, match=r"temprature: .*'temperature'"):
        tiny_vlm.chat(ask(images["red"]), stream=True, temprature=0)
    assert tiny_vlm.chat(ask(images["red"]), max_tokens=2).usage.completion_tokens == 2


def test_detail_keyword_reaches_images_without_their_own(tiny_vlm, images):
    msgs = ask(images["red"])
    assert tiny_vlm.chat(msgs, max_tokens=1, detail="low").timings.images[0].detail == "low"
    assert tiny_vlm.chat(msgs, max_tokens=1).timings.images[0].detail == "auto"
    own = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(images["red"]), "detail": "high"}},
        {"type": "text", "text": "?"}]}]
    assert tiny_vlm.chat(own, max_tokens=1, detail="low").timings.images[0].detail == "high"
    with pytest.raises(RequestError, match="detail"):
        tiny_vlm.chat(msgs, max_tokens=1, detail="medium")  # type: ignore[call-overload]


def test_keywords_replace_the_fields_of_a_whole_request(tiny_vlm, images):
    request = {"messages": ask(images["red"]), "max_tokens": 9, "temperature": 0}
    assert tiny_vlm.chat(request, max_tokens=1).usage.completion_tokens == 1
    with pytest.raises(RequestError, match=r"^n: "):
        tiny_vlm.chat(request, n=2)
    with pytest.raises(RequestError, match=r"model: .*'other'"):
        tiny_vlm.chat(request, model="other")
    assert tiny_vlm.chat(request, model=tiny_vlm.name, max_tokens=1).choices


# -- unknown settings keys -----------------------------------------------------------------


def test_typo_in_the_settings_file_names_key_file_and_closest(home, tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[runtime]\nthread = 4\n")
    with pytest.raises(ConfigError) as err:
        load_settings(config_file=cfg)
    msg = str(err.value)
    assert "'runtime.thread'" in msg and str(cfg) in msg and "'runtime.threads'" in msg
    cfg.write_text("[runtim]\nthreads = 4\n")
    with pytest.raises(ConfigError, match=r"'runtim' .*did you mean 'runtime'"):
        load_settings(config_file=cfg)


@pytest.mark.parametrize(("var", "closest"), [
    ("EDGE_VLM_RUNTIME__THREAD", "runtime.threads"),
    ("EDGE_VLM_THREADS", "EDGE_VLM_RUNTIME__THREADS"),
    ("EDGE_VLM_SAMPLING__TEMPRATURE", "sampling.temperature"),
])
def test_typo_in_an_environment_variable_names_it(home, monkeypatch, var, closest):
    monkeypatch.setenv(var, "4")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert var in str(err.value) and f"'{closest}'" in str(err.value)


def test_unknown_override_key_is_refused(home):
    with pytest.raises(ConfigError,
                       match=r"'runtime\.thread' in the arguments.*'runtime\.threads'"):
        Settings().with_overrides({"runtime.thread": 4})


def test_the_cli_refuses_a_typo_in_the_environment(home, tiny_paths):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "edge_vlm.cli", "info"], capture_output=True, text=True,
        timeout=120, env={**os.environ, "EDGE_VLM_RUNTIME__THRADS": "2"})
    assert out.returncode == 2
    assert "EDGE_VLM_RUNTIME__THRADS" in out.stderr and "'runtime.threads'" in out.stderr


def test_with_overrides_reads_neither_environment_nor_file(home, monkeypatch, tmp_path):
    settings = load_settings()
    monkeypatch.setenv("EDGE_VLM_RUNTIME__THREADS", "not a number")
    monkeypatch.setenv("EDGE_VLM_SAMPLING__MAX_TOKENS", "7")
    changed = settings.with_overrides({"runtime.n_ctx": 128, "images.allow_remote": False})
    assert changed.runtime.n_ctx == 128 and changed.runtime.threads is None
    assert changed.sampling.max_tokens == settings.sampling.max_tokens != 7
    assert settings.with_overrides({"runtime.n_ctx": None}) is settings  # None: not given


# -- settings.store.* reach the store --------------------------------------------------------


def _install(pair, name: str) -> Path:  # type: ignore[no-untyped-def]
    from edge_vlm.store.importer import import_pair
    from edge_vlm.store.store import Store

    import_pair(Store.default(), pair.model, pair.mmproj, name=name, check_load=False)
    model, _ = Store.default().paths(Store.default().get(name))
    return model


def test_verify_on_load_from_the_settings_given_to_load(home, pair):
    blob = _install(pair, "v")
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    strict = load_settings().with_overrides({"store.verify_on_load": True})
    with pytest.raises(StoreError, match=r"model 'v': model file .* changed"):
        edge_vlm.load("v", settings=strict, threads=1)
    with edge_vlm.load("v", settings=load_settings(), threads=1, gpu="off") as vlm:
        assert vlm.name == "v"  # not verified: settings say so


MIRROR_ENTRY = """[models.in-mirror]
title = "A mirrored model"
repo = "example/in-mirror-GGUF"
license = "apache-2.0"
parameters = "256M"
context = 8192
layers = 30
kv_heads = 3
head_dim = 64
default = "Q8_0"
quants = { Q8_0 = { file = "in-mirror-Q8_0.gguf", size_mb = 175 } }
mmproj = { file = "mmproj-in-mirror.gguf", size_mb = 104 }
"""


def test_catalog_file_from_the_settings_given_to_load(home, tmp_path):
    extra = tmp_path / "mirror.toml"
    extra.write_text(MIRROR_ENTRY)
    settings = load_settings().with_overrides({"store.catalog_file": str(extra)})
    with pytest.raises(ModelNotFoundError, match="models pull in-mirror"):
        edge_vlm.load("in-mirror", settings=settings)
    with pytest.raises(ModelNotFoundError, match="unknown model 'in-mirror'"):
        edge_vlm.load("in-mirror", settings=load_settings())


def test_store_models_have_the_manifest_sha256_as_identity(home, pair):
    from edge_vlm.loader import file_fingerprint
    from edge_vlm.preflight import open_store
    from edge_vlm.resolve import resolve_model
    from edge_vlm.store.store import Store

    _install(pair, "ident")
    ref = resolve_model("ident", store=open_store(load_settings()))
    recorded = {f.role: f.sha256 for f in Store.default().get("ident").files}
    assert (ref.model_sha256, ref.mmproj_sha256) == (recorded["model"], recorded["mmproj"])
    assert file_fingerprint(ref.mmproj, ref.mmproj_sha256) == recorded["mmproj"][:32]
    assert file_fingerprint(ref.model) == recorded["model"][:32]  # a blob, by its name
    assert file_fingerprint(pair.model) != recorded["model"][:32]  # elsewhere: path-based
    by_path = resolve_model(pair.model, pair.mmproj)
    assert by_path.mmproj_sha256 == ""  # a file given by path may change: no recorded identity
