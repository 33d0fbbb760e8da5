"""Hostile templates are refused BEFORE they build their result: memory stays small, the error says "render limit".

Each hostile template is rendered by the real Renderer in a child process that
reports its peak resident size (``ru_maxrss``) before and after, so the
assertion is about memory actually allocated, not about timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.compose.render import InMemoryTemplateStore, Renderer, TemplateConfig

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
MAX_GROWTH_MB = 50

HOSTILE = {
    "join_separator": "{{ range(100000)|join('y' * 4000)|length }}",
    "str_join_method": "{{ ('y' * 4000).join(['a'] * 100000)|length }}",
    "replace_filter": "{{ ('a' * 100000)|replace('a', 'b' * 4000)|length }}",
    "replace_empty_old": "{{ ('a' * 1000000)|replace('', 'b' * 400)|length }}",
    "replace_method": "{{ ('a' * 100000).replace('a', 'b' * 4000)|length }}",
    "indent_string": "{{ ('a\\n' * 1000000)|indent('y' * 400)|length }}",
    "indent_width": "{{ ('a\\n' * 1000000)|indent(4000)|length }}",
    "wordwrap_wrapstring": "{{ ('a ' * 1000000)|wordwrap(1, wrapstring='y' * 400)|length }}",
    "format_filter": "{{ ('%s' * 1000000)|format(*(['y' * 400] * 1000))|length }}",
    "percent_operator": "{{ (('%s' * 100000) % ('y' * 4000,))|length }}",
    "str_format_method": "{% set a = 'y' * 4000000 %}{{ ('{0}' * 20).format(a)|length }}",
    "tilde_chain": "{% set a = 'y' * 4000000 %}{{ (a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a)|length }}",
    "list_repetition_of_big_items": "{% set a = ['y' * 4000] * 1000000 %}{{ a|string|length }}",
    "nested_list_literals_printed": (
        "{% set a = 'y' * 40000 %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}"
        "{% set c = [b, b, b, b, b, b, b, b, b, b] %}{% set d = [c, c, c, c, c, c, c, c, c, c] %}{{ d }}"
    ),
    "tojson_indent": "{% set a = ['y'] * 10000 %}{{ a|tojson(indent=100000)|length }}",
    "batch_fill": "{{ range(10)|batch(100000000, 'x')|list|length }}",
    "macro_buffer": (
        "{% set a = 'y' * 4000 %}{% macro m() %}{% for i in range(100000) %}{{ a }}{% endfor %}{% endmacro %}"
        "{{ m()|length }}"
    ),
    "set_block_buffer_escaped": (
        "{% set a = '&' * 4000 %}{% set x %}{% for i in range(100000) %}{{ a }}{% endfor %}{% endset %}"
        "{{ x|length }}"
    ),
    "expandtabs": "{{ ('\\t' * 1000000).expandtabs(4000)|length }}",
    "translate": "{{ ('a' * 1000000).translate({97: 'y' * 400})|length }}",
    "split_into_many_strings": "{{ ('a ' * 2000000).split()|length }}",
    "urlize_target": "{{ ('a.b ' * 100000)|urlize(target='y' * 4000)|length }}",
}

_CHILD = r"""
import json, resource, sys
from pathlib import Path
from engine.compose.render import InMemoryTemplateStore, Renderer, TemplateConfig, TemplateError
cases = json.loads(sys.stdin.read())
store = InMemoryTemplateStore()
r = Renderer(TemplateConfig(directory=Path(sys.argv[1])), store)
store.put("warm", {"subject": "s", "html": "{{ 'x' * 10 }}{{ [1, 2]|join(',') }}"})
r.render("warm", {})
out = {}
for name, source in cases.items():
    store.put(name, {"subject": "s", "html": source})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        r.render(name, {})
        error = None
    except TemplateError as exc:
        error = str(exc)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out[name] = {"error": error, "growth_mb": (after - before) / 1024}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def child_results() -> dict[str, Any]:
    """One child renders every case in turn; ru_maxrss is a high-water mark, so a case's growth is its own."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(TEMPLATES)],
        input=json.dumps(HOSTILE), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_template_is_refused_before_it_allocates(child_results: dict[str, Any], case: str) -> None:
    result = child_results[case]
    assert result["error"] is not None, f"{case} rendered"
    assert "render limit" in result["error"], result["error"]
    assert result["growth_mb"] < MAX_GROWTH_MB, f"{case}: peak memory grew {result['growth_mb']:.0f} MB"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ ['a', 'b', 'c']|join(', ') }}", "a, b, c"),
        ("{{ range(3)|join('-') }}", "0-1-2"),
        ("{{ 'a\nb'|replace('\n', ' / ') }}", "a / b"),
        ("{{ 'a\nb'|indent(2, true) }}", "  a\n  b"),
        ("{{ 'aaa bbb'|wordwrap(3) }}", "aaa\nbbb"),
        ("{{ '%s-%s'|format(1, 2) }}", "1-2"),
        ("{{ '{0}{1}'.format('x', 'y') }}", "xy"),
        ("{{ '%d%%' % 5 }}", "5%"),
        ("{{ 'a' ~ 1 ~ [2] }}", "a1[2]"),
        ("{{ ('ab' * 3)|list|length }}", "6"),
        ("{{ range(5)|batch(2, 0)|list }}", "[[0, 1], [2, 3], [4, 0]]"),
        ("{{ {'a': [1, 2]}|tojson(indent=2)|length }}", "29"),
        ("{% macro m(x) %}<{{ x }}>{% endmacro %}{% for i in range(3) %}{{ m(i) }}{% endfor %}", "<0><1><2>"),
        ("{% set t %}{% for i in range(3) %}{{ i }}{% endfor %}{% endset %}{{ t }}", "012"),
        ("{{ 'a,b'.split(',') }} {{ 'x\ty'.expandtabs(2) }} {{ 'ab'.translate({97: 'zz'}) }}", "['a', 'b'] x y zzb"),
    ],
)
def test_ordinary_uses_of_the_guarded_operations_still_render(source: str, expected: str) -> None:
    store = InMemoryTemplateStore()
    r = Renderer(TemplateConfig(directory=TEMPLATES), store)
    parts = {"subject": "s", "text": source}
    r.validate_template("t", parts)
    store.put("t", parts)
    assert r.render("t", {}).text == expected


def test_a_render_close_to_the_output_limit_still_fits() -> None:
    """The projections are bounds, not refusals of anything big: output just under the cap renders."""
    store = InMemoryTemplateStore()
    r = Renderer(TemplateConfig(directory=TEMPLATES, max_output_size=100_000), store)
    parts = {
        "subject": "s",
        "text": "{{ range(5000)|join('y' * 10)|length }} {{ ('a' * 900)|replace('a', 'b' * 100)|length }}"
        "{% macro m() %}{% for i in range(900) %}{{ 'z' * 50 }}{% endfor %}{% endmacro %} {{ m()|length }}",
    }
    store.put("t", parts)
    assert r.render("t", {}).text == "68880 90000 45000"
