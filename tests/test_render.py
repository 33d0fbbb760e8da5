"""Sandboxed rendering: escapes refused, errors located, variables named, output bounded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.compose.render import (
    InMemoryTemplateStore,
    Renderer,
    TemplateConfig,
    TemplateError,
    merge_vars,
)
from engine.compose.text import html_to_text
from engine.errors import ValidationFailed

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


@pytest.fixture
def store() -> InMemoryTemplateStore:
    return InMemoryTemplateStore()


@pytest.fixture
def renderer(store: InMemoryTemplateStore) -> Renderer:
    return Renderer(TemplateConfig(directory=TEMPLATES), store)


def upload(renderer: Renderer, store: InMemoryTemplateStore, name: str, **parts: str) -> int:
    renderer.validate_template(name, parts)
    return store.put(name, parts)


def render_html(renderer: Renderer, store: InMemoryTemplateStore, html: str, variables: dict | None = None) -> str:
    upload(renderer, store, "t", subject="s", html=html)
    out = renderer.render("t", variables or {}).html
    assert out is not None
    return out


# ----------------------------------------------------------------- escapes


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ self._TemplateReference__context }}",
        "{{ joiner['__init__'] }}",
        "{{ ''|attr('__class__') }}",
        "{{ x.__dict__ }}",
    ],
)
def test_dunder_and_private_access_refused_at_upload(renderer: Renderer, source: str) -> None:
    with pytest.raises(TemplateError) as exc:
        renderer.validate_template("evil", {"subject": "s", "html": "ok\n" + source})
    assert exc.value.template == "evil"
    assert exc.value.part == "html"
    assert exc.value.line == 2
    assert "private attribute" in str(exc.value)


def test_escape_built_at_runtime_is_blocked_by_the_sandbox(renderer: Renderer, store: InMemoryTemplateStore) -> None:
    # The attribute name is computed, so the parse-time check cannot see it; the sandbox must.
    src = "{{ ''|attr('_' ~ '_class__') }}"
    with pytest.raises(TemplateError) as exc:
        render_html(renderer, store, src)
    assert "unsafe" in str(exc.value) or "not allowed" in str(exc.value)


def test_mutating_a_list_is_refused(renderer: Renderer, store: InMemoryTemplateStore) -> None:
    with pytest.raises(TemplateError) as exc:
        render_html(renderer, store, "{{ items.append(1) }}", {"items": []})
    assert "unsafe" in str(exc.value)


def test_huge_range_refused(renderer: Renderer, store: InMemoryTemplateStore) -> None:
    with pytest.raises(TemplateError) as exc:
        render_html(renderer, store, "{% for i in range(10**9) %}x{% endfor %}")
    assert "render limit" in str(exc.value)
    assert exc.value.part == "html"


def test_nested_loops_hit_the_loop_budget(store: InMemoryTemplateStore) -> None:
    r = Renderer(TemplateConfig(directory=TEMPLATES, max_loop_iterations=10_000), store)
    with pytest.raises(TemplateError) as exc:
        render_html(r, store, "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}")
    assert "loop" in str(exc.value)


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'x' * 100000000 }}",
        "{{ 9 ** (9 ** 9) }}",
        "{{ 'x'.ljust(100000000) }}",
        "{{ 'x'|center(100000000) }}",
        "{{ '{:>100000000}'.format(1) }}",
        "{{ '%100000000d' % 1 }}",
        "{{ ('a' * 4000).replace('a', 'a' * 4000) }}",
        "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}",
        "{% set ns = namespace(s=['a']) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    ],
)
def test_size_explosions_refused(renderer: Renderer, store: InMemoryTemplateStore, source: str) -> None:
    with pytest.raises(TemplateError) as exc:
        render_html(renderer, store, source)
    assert "limit" in str(exc.value) or "too large" in str(exc.value)


def test_output_size_is_capped(store: InMemoryTemplateStore) -> None:
    r = Renderer(TemplateConfig(directory=TEMPLATES, max_output_size=10_000), store)
    with pytest.raises(TemplateError) as exc:
        render_html(r, store, "{% for i in range(5000) %}hello {% endfor %}")
    assert "output is over the limit" in str(exc.value)


def test_doubling_by_concatenation_is_capped(store: InMemoryTemplateStore) -> None:
    r = Renderer(TemplateConfig(directory=TEMPLATES, max_output_size=100_000), store)
    sets = "".join(f"{{% set a{i + 1} = a{i} ~ a{i} %}}" for i in range(40))
    with pytest.raises(TemplateError) as exc:
        render_html(r, store, "{% set a0 = 'xxxxxxxx' %}" + sets + "{{ a40|length }}")
    assert "limit" in str(exc.value)


def test_infinite_recursion_is_an_error(renderer: Renderer, store: InMemoryTemplateStore) -> None:
    with pytest.raises(TemplateError) as exc:
        render_html(renderer, store, "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    assert "recursion" in str(exc.value)


def test_part_size_is_bounded(store: InMemoryTemplateStore) -> None:
    r = Renderer(TemplateConfig(directory=TEMPLATES, max_part_size=1000), store)
    with pytest.raises(TemplateError) as exc:
        r.validate_template("big", {"subject": "s", "html": "x" * 1001})
    assert exc.value.part == "html"
    assert "limit" in str(exc.value)


# ----------------------------------------------------------------- validation errors


def test_syntax_error_names_template_part_and_line(renderer: Renderer) -> None:
    with pytest.raises(TemplateError) as exc:
        renderer.validate_template("promo", {"subject": "hi", "html": "<p>\n<p>\n{% if x %}\nunclosed"})
    err = exc.value
    assert isinstance(err, ValidationFailed) and err.status == 422
    assert (err.template, err.part) == ("promo", "html")
    assert err.line is not None and err.line >= 3
    assert "promo" in str(err) and "line" in str(err)


def test_unknown_filter_is_reported_at_upload(renderer: Renderer) -> None:
    with pytest.raises(TemplateError) as exc:
        renderer.validate_template("promo", {"subject": "{{ x|nosuchfilter }}", "text": "t"})
    assert exc.value.part == "subject"
    assert "nosuchfilter" in str(exc.value)


def test_unknown_layout_is_reported_at_upload(renderer: Renderer) -> None:
    with pytest.raises(TemplateError) as exc:
        renderer.validate_template("promo", {"subject": "s", "html": '{% extends "nope/html.html" %}'})
    assert "nope/html.html" in str(exc.value)


def test_shape_is_checked(renderer: Renderer) -> None:
    with pytest.raises(TemplateError, match="subject"):
        renderer.validate_template("p", {"html": "x"})
    with pytest.raises(TemplateError, match="html"):
        renderer.validate_template("p", {"subject": "x"})
    with pytest.raises(TemplateError, match="unknown parts"):
        renderer.validate_template("p", {"subject": "x", "text": "t", "amp": "x"})
    with pytest.raises(TemplateError, match="name"):
        renderer.validate_template("../etc", {"subject": "x", "text": "t"})


# ----------------------------------------------------------------- variables


def test_missing_variable_is_named_at_render(renderer: Renderer, store: InMemoryTemplateStore) -> None:
    upload(renderer, store, "hello", subject="Hi {{ name }}", text="Hello\n{{ name }} {{ city }}")
    with pytest.raises(TemplateError) as exc:
        renderer.render("hello", {"name": "Ann"})
    assert exc.value.variable == "city"
    assert exc.value.part == "text"
    assert exc.value.field == "variables.city"
    assert "'city'" in str(exc.value)


def test_required_variables_follow_extends_and_include(renderer: Renderer, store: InMemoryTemplateStore) -> None:
    upload(renderer, store, "partial", subject="p", html="<p>{{ footer_note }}</p>")
    upload(
        renderer, store, "promo",
        subject="{{ headline }}",
        html='{% extends "base/html.html" %}{% block content %}{{ body }}{% include "partial@1/html.html" %}'
             "{% set local = 1 %}{{ local }}{% for i in items %}{{ i }}{% endfor %}{% endblock %}",
    )
    required = renderer.required_variables("promo")
    # company/lang/preheader in the layout are optional (default / is defined).
    assert required == {"headline", "body", "footer_note", "items"}
    assert renderer.missing_variables("promo", {"headline": 1, "body": 2, "items": []}) == ["footer_note"]
    with pytest.raises(TemplateError) as exc:
        renderer.check_variables("promo", {"headline": 1, "body": 2, "items": []})
    assert exc.value.variable == "footer_note"


def test_shipped_templates_required_variables(renderer: Renderer) -> None:
    assert renderer.required_variables("welcome") == {"name", "product", "login_url"}
    assert renderer.required_variables("digest") == {"name", "articles", "unsubscribe_url"}
    assert renderer.required_variables("receipt") >= {"order_id", "items", "total"}


def test_merge_vars_recipient_wins() -> None:
    assert merge_vars({"a": 1, "b": 2}, {"b": 3}) == {"a": 1, "b": 3}
    assert merge_vars(None, {"x": 1}) == {"x": 1}
    assert merge_vars({"x": 1}, None) == {"x": 1}


# ----------------------------------------------------------------- rendering


def test_shipped_templates_render(renderer: Renderer) -> None:
    out = renderer.render(
        "welcome", {"name": "Zoë <script>", "product": "Acme", "login_url": "https://acme.test/login?a=1&b=2"}
    )
    assert out.subject == "Welcome to Acme, Zoë <script>!"  # subject is not HTML: no escaping
    assert out.html is not None
    assert "Zoë &lt;script&gt;" in out.html  # html is autoescaped
    assert 'href="https://acme.test/login?a=1&amp;b=2"' in out.html
    assert "<!doctype html>" in out.html  # the layout was extended
    assert "Zoë <script>" in out.text and "&lt;" not in out.text  # text is not escaped
    receipt = renderer.render(
        "receipt",
        {"name": "A", "order_id": "R-1", "currency": "EUR", "total": "12.00",
         "items": [{"quantity": 2, "name": "Tea", "price": "6.00"}]},
    )
    assert "2 x Tea: 6.00 EUR" in receipt.text


def test_every_shipped_template_validates(renderer: Renderer) -> None:
    for name in ("welcome", "password_reset", "receipt", "digest"):
        parts = {p: (TEMPLATES / name / f).read_text() for p, f in
                 (("subject", "subject.txt"), ("html", "html.html"), ("text", "text.txt"))}
        renderer.validate_template(name, parts)


def test_text_is_derived_from_html_when_missing(renderer: Renderer, store: InMemoryTemplateStore) -> None:
    upload(
        renderer, store, "news", subject="News",
        html='{% extends "base/html.html" %}{% block content %}<h1>Hello {{ name }}</h1>'
             '<p>Read <a href="https://x.test/a?b=1&amp;c=2">the post</a>.<br>Bye</p>'
             "<ul><li>one</li><li>two</li></ul><style>p{color:red}</style>{% endblock %}",
    )
    out = renderer.render("news", {"name": "Ann"})
    assert "<" not in out.text
    assert "Hello Ann" in out.text
    assert "the post (https://x.test/a?b=1&c=2)" in out.text
    assert "\nBye" in out.text
    assert "- one\n- two" in out.text
    assert "color:red" not in out.text


def test_html_to_text_details() -> None:
    text = html_to_text(
        '<p>A&nbsp;&amp;&nbsp;B</p><p><a href="https://x.test">https://x.test</a> '
        '<a href="mailto:a@b.test">a@b.test</a> <a href="#top">top</a></p><hr><pre>  keep\n  this</pre>'
    )
    assert "A\xa0&\xa0B" in text
    assert "https://x.test (https://x.test)" not in text
    assert "a@b.test (" not in text and "top (#top)" not in text
    assert "  keep\n  this" in text


def test_versions_and_latest(renderer: Renderer, store: InMemoryTemplateStore) -> None:
    upload(renderer, store, "v", subject="one", text="1")
    upload(renderer, store, "v", subject="two", text="2")
    assert renderer.render("v", {}).subject == "two"
    assert renderer.render("v@1", {}).subject == "one"
    with pytest.raises(TemplateError, match="no such template version"):
        renderer.render("v@9", {})
    with pytest.raises(TemplateError, match="no such template"):
        renderer.render("missing", {})
    with pytest.raises(TemplateError):
        renderer.render("v@x", {})


def test_uploaded_template_shadows_file_template(renderer: Renderer, store: InMemoryTemplateStore) -> None:
    assert renderer.render("password_reset", {"name": "a", "product": "p", "reset_url": "https://r"}).html
    upload(renderer, store, "password_reset", subject="custom", text="t")
    assert renderer.render("password_reset", {}).subject == "custom"


def test_batch_renders_without_reparsing(renderer: Renderer) -> None:
    base = {"product": "Acme", "login_url": "https://acme.test"}
    renderer.render("welcome", merge_vars(base, {"name": "first"}))
    parsed = renderer.env.parse_count
    outs = [renderer.render("welcome", merge_vars(base, {"name": f"user{i}"})) for i in range(50)]
    assert renderer.env.parse_count == parsed
    assert outs[7].subject == "Welcome to Acme, user7!"


def test_subject_is_one_line(renderer: Renderer, store: InMemoryTemplateStore) -> None:
    upload(renderer, store, "s", subject="Hello\n{{ name }}\n", text="t")
    assert renderer.render("s", {"name": "a\r\nBcc: x@y.test"}).subject == "Hello a Bcc: x@y.test"


def test_runtime_error_is_a_template_error(renderer: Renderer, store: InMemoryTemplateStore) -> None:
    with pytest.raises(TemplateError) as exc:
        render_html(renderer, store, "line1\n{{ 1 / zero }}", {"zero": 0})
    assert "ZeroDivisionError" in str(exc.value)
    assert exc.value.line == 2


def test_required_variables_are_cached_and_follow_file_edits(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "html.html").write_text("<body>{% block content %}{% endblock %}{{ footer }}</body>")
    (tmp_path / "note").mkdir()
    (tmp_path / "note" / "subject.txt").write_text("{{ title }}")
    (tmp_path / "note" / "html.html").write_text('{% extends "base/html.html" %}{% block content %}{{ body }}{% endblock %}')
    r = Renderer(TemplateConfig(directory=tmp_path, reload_check_interval=0))
    assert r.required_variables("note") == {"title", "body", "footer"}
    parsed = r.env.parse_count
    assert r.required_variables("note") == {"title", "body", "footer"}
    assert r.env.parse_count == parsed  # cached
    layout = tmp_path / "base" / "html.html"
    layout.write_text("<body>{% block content %}{% endblock %}{{ signature }}</body>")
    st = layout.stat()
    os.utime(layout, (st.st_atime, st.st_mtime + 10))  # make the edit visible to mtime checks
    assert r.required_variables("note") == {"title", "body", "signature"}
    out = r.render("note", {"title": "T", "body": "B", "signature": "S"})
    assert out.html == "<body>BS</body>" and out.text == "BS\n"
