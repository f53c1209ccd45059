from stackrlhf.data.markdown import clean_whitespace, html_to_md


def test_code_block_becomes_fenced_code():
    md = html_to_md("<p>Try:</p>\n<pre><code>for i in range(3):\n    print(i)\n</code></pre>")
    assert "```\nfor i in range(3):\n    print(i)\n```" in md
    assert md.startswith("Try:")


def test_links_lists_and_inline_code_survive():
    md = html_to_md('<ul><li>one <a href="https://example.org/x">link</a></li><li><code>a&lt;b</code></li></ul>')
    assert "- one [link](https://example.org/x)" in md
    assert "- `a<b`" in md


def test_entities_are_decoded_and_scripts_dropped():
    md = html_to_md("<p>a &amp; b</p><script>alert(1)</script>")
    assert md == "a & b"


def test_whitespace_cleanup():
    assert clean_whitespace("a  \n\n\n\nb \t\n") == "a\n\nb"
    assert html_to_md("") == ""
    assert html_to_md("<p>line one<br>line two</p>") == "line one\\\nline two"
