"""The number-format check on built pages (atlas_core.book.formats)."""

from atlas_core.book.formats import format_problems, text_blocks


def test_the_books_own_formats_pass():
    html = ("<p>O<sub>h</sub> − null −0.004 [−0.019, +0.011]; 1.28× [1.20×, 1.49×]; 16,476 [12,048, 23,392]; "
            "+0.011 [0.000, +0.022]; KL 4.26e-02 [4.01e-02, 4.57e-02]; qwen2.5-coder-0.5b, k = 4-10, 2026-12-02</p>"
            "<table><tr><td>−0.007 [−0.028, +0.014]</td><td>0.284 [0.276, 0.292]</td></tr></table>")
    assert format_problems(html) == []


def test_each_kind_of_format_fault_is_named():
    problems = format_problems("<p>Fisher 16,476 [12,048 to 23,392] and 1.43× [1.05, 1.61]</p>"
                               "<table><tr><td>-0.050 [-0.247, 0.154]</td></tr></table>")
    kinds = sorted({p.split(":")[0] for p in problems})
    assert kinds == ["hyphen-minus for a minus sign", "interval written with 'to'", "ratio bounds without ×",
                     "signed interval with an unsigned bound"]
    assert any("−0.050" not in p and "-0.050 [-0.247, 0.154]" in p for p in problems)


def test_code_math_and_scripts_are_not_prose():
    html = ('<p>a <code>x = -1</code> b <span class="math">\\(k = -3\\)</span></p><pre>[-2 to 3]</pre>'
            '<script>var a = [-1, 2]</script><div class="cell_input"><p>-4</p></div><p>after -5</p>')
    assert text_blocks(html) == ["a b", "after -5"]
    assert format_problems(html) == ["hyphen-minus for a minus sign: …after -5…"]
