"""bench.objects: callgrind's cost lines sorted into the components of the report."""

from __future__ import annotations

import pytest

from bench import objects

PY = "Python interpreter (tlsfront, trio, pyOpenSSL's Python code)"


@pytest.mark.parametrize(
    ("line", "cost", "what"),
    [
        (
            "189,706,059 (21.56%)  /b/Python-3.11.7/Python/ceval.c:_PyEval_EvalFrameDefault'2"
            " [/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0]",
            189_706_059,
            PY,
        ),
        (  # inlined from a header: no object, the interpreter's source file says it
            "  5,742,040 ( 0.65%)  /b/Python-3.11.7/Include/pycore_frame.h:_PyFrame_Clear",
            5_742_040,
            PY,
        ),
        (
            " 33,763,663 ( 3.84%)  ???:sha512_block_data_order_avx2"
            " [/v/site-packages/cryptography/hazmat/bindings/_rust.abi3.so]",
            33_763_663,
            "OpenSSL (as bundled by cryptography)",
        ),
        (
            "  1,000 ( 0.10%)  ???:EVP_DigestUpdate [/usr/lib/libcrypto.so.3]",
            1000,
            "OpenSSL (libcrypto)",
        ),
        (
            "  2,000 ( 0.10%)  ???:ngx_mail_proxy_handler [/usr/lib/ngx_mail_module.so]",
            2000,
            "nginx (modules)",
        ),
        (
            "  3,000 ( 0.10%)  src/event/ngx_event.c:ngx_process_events [/usr/sbin/nginx]",
            3000,
            "nginx",
        ),
        (
            "  4,000 ( 0.10%)  ./string/memset.S:__memset_avx2 [/usr/lib/libc.so.6]",
            4000,
            "libc",
        ),
        (
            "  5,000 ( 0.10%)  ???:0x0000000000401000 [/usr/lib/ld-linux-x86-64.so.2]",
            5000,
            objects.OTHER,
        ),
    ],
)
def test_cost_lines_by_component(line: str, cost: int, what: str) -> None:
    match = objects._LINE.match(line)
    assert match is not None
    assert int(match[1].replace(",", "")) == cost
    assert objects.component(match["object"] or match["file"]) == what


def test_the_total_line_is_not_a_cost_line() -> None:
    total = "879,930,515 (100.0%)  PROGRAM TOTALS"
    assert objects._TOTAL.match(total)
    assert objects._LINE.match(total) is None


def test_markdown_shares() -> None:
    lines = objects.markdown({("tlsfront", "starttls"): {PY: 6e6, "libc": 2e6}})
    assert "| Python interpreter (tlsfront, trio, pyOpenSSL's Python code) | 6.00 | 75 % |" in lines
    assert "| libc | 2.00 | 25 % |" in lines
