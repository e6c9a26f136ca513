"""Settings precedence, the sandboxed chat template and stop strings (no model needed)."""

from __future__ import annotations

import pytest

from edge_vlm.config import load_settings
from edge_vlm.errors import ConfigError, ModelLoadError, RequestError
from edge_vlm.schema import parse_request
from edge_vlm.stops import StopFilter
from edge_vlm.template import ChatTemplate


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[runtime]\nthreads = 3\nn_batch = 64\n[sampling]\nmax_tokens = 10\n")
    monkeypatch.setenv("EDGE_VLM_RUNTIME__N_BATCH", "128")
    s = load_settings({"runtime.threads": 5}, config_file=cfg)
    assert s.runtime.threads == 5  # flag beats file
    assert s.runtime.n_batch == 128  # env beats file
    assert s.sampling.max_tokens == 10  # file beats default
    assert s.images.allow_remote is False  # default: never touch the network


def test_invalid_setting_names_the_key(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[images]\nmax_bytes = -5\n")
    with pytest.raises(ConfigError, match=r"images\.max_bytes"):
        load_settings(config_file=cfg)


def test_broken_toml_is_a_config_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[runtime\nthreads = ")
    with pytest.raises(ConfigError, match="cannot read settings file"):
        load_settings(config_file=cfg)


def msgs(*pairs):  # type: ignore[no-untyped-def]
    return parse_request({"messages": [{"role": r, "content": c} for r, c in pairs]}).messages


def test_image_parts_become_markers_where_they_appear():
    t = ChatTemplate(None)
    m = parse_request({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "A"}, {"type": "image_url", "image_url": {"url": "x.png"}},
        {"type": "text", "text": "B"}]}]}).messages
    out = t.render(m, "<__media__>")
    assert "A<__media__>B" in out and out.endswith("<|assistant|>\n")


def test_string_only_templates_get_joined_content():
    t = ChatTemplate("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    m = parse_request({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x.png"}},
        {"type": "text", "text": "hi"}]}]}).messages
    assert t.render(m, "<M>") == "[<M>hi]"


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% for x in range(100000000) %}{% endfor %}",
    "{{ 'a' * 100000000 }}",
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{% for i in range(99999) %}{{ 'x' * 99 }}{% endfor %}",
])
def test_hostile_templates_are_stopped(source):
    # Refused at load by the child-process probe, or stopped in process at render.
    with pytest.raises(ModelLoadError, match="chat template"):
        ChatTemplate(source).render(msgs(("user", "hi")), "<M>")
    with pytest.raises(ModelLoadError, match="chat template"):
        ChatTemplate(source, check_in_child=False).render(msgs(("user", "hi")), "<M>")


def test_template_raise_exception_is_a_request_error():
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(RequestError, match="roles must alternate"):
        t.render(msgs(("user", "hi")), "<M>")


def test_stop_string_split_over_tokens_is_held_back():
    f = StopFilter(["###"])
    out = f.feed(b"Hello #") + f.feed(b"#") + f.feed(b"# rest")
    assert out == "Hello " and f.stopped


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    f = StopFilter(["END"])
    assert f.feed(b"a E") == "a " and f.feed(b"x") == "Ex" and f.flush() == ""


def test_utf8_split_over_tokens_is_joined():
    f = StopFilter([])
    data = "é🙂".encode()
    out = "".join(f.feed(data[i:i + 1]) for i in range(len(data))) + f.flush()
    assert out == "é🙂"
