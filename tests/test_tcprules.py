"""tcprules source files: every form, tcpserver's look-up order, errors, IPv6.

The expectations follow ucspi-tcp 0.88 (tcprules + tcpserver); the last tests
compare with the real tcprules/tcprulescheck (Debian's ucspi-tcp) directly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tlsfront.qmail.tcprules import Rule, Rules, RulesError


def verdict(rule: Rule | None) -> tuple[str | None, bool, dict[str, str]]:
    """(key, allow, env) as tcprulescheck reports it; key None = no rule.

    A denied client gets no environment: tcprulescheck shows none then.
    """
    if rule is None:
        return None, True, {}
    return rule.key, rule.allow, dict(rule.env) if rule.allow else {}


def key_of(rules: Rules, ip: str, host: str | None = None, info: str | None = None) -> str | None:
    return verdict(rules.match(ip, host, info))[0]


# -- the forms -------------------------------------------------------------


def test_exact_address_allow_with_variables() -> None:
    rules = Rules.parse('1.2.3.4:allow,RELAYCLIENT="",GREETING="hi there"\n', "tcp.smtp")
    rule = rules.match("1.2.3.4")
    assert rule == Rule(True, {"RELAYCLIENT": "", "GREETING": "hi there"}, "1.2.3.4", "tcp.smtp:1")
    assert rules.match("1.2.3.5") is None


def test_deny_and_deny_with_variables() -> None:
    rules = Rules.parse('1.2.3.4:deny\n1.2.3.5:deny,X="1"\n')
    assert rules.match("1.2.3.4") == Rule(False, {}, "1.2.3.4", "<rules>:1")
    assert rules.match("1.2.3.5") == Rule(False, {"X": "1"}, "1.2.3.5", "<rules>:2")


def test_prefixes_end_with_a_dot() -> None:
    rules = Rules.parse("127.:allow\n192.168.:deny\n10.1.2.:deny\n192.168.1:allow\n")
    assert key_of(rules, "127.0.0.1") == "127."
    assert key_of(rules, "192.168.7.7") == "192.168."
    assert key_of(rules, "10.1.2.200") == "10.1.2."
    assert key_of(rules, "10.1.20.1") is None
    # without the trailing dot it is an exact key, never a prefix
    assert key_of(rules, "192.168.10.1") == "192.168."
    assert key_of(rules, "1.127.0.1") is None


def test_range_in_last_component_expands_to_exact_keys() -> None:
    rules = Rules.parse('192.168.1.1-99:allow,RELAYCLIENT=""\n')
    assert [key_of(rules, f"192.168.1.{n}") for n in (0, 1, 50, 99, 100)] == [
        None,
        "192.168.1.1",
        "192.168.1.50",
        "192.168.1.99",
        None,
    ]
    assert len(rules) == 99
    assert all(rule.source == "<rules>:1" for rule in rules)


def test_range_in_an_inner_component_expands_to_prefixes() -> None:
    rules = Rules.parse("10.2-3.:deny\n")
    assert {rule.key for rule in rules} == {"10.2.", "10.3."}
    assert key_of(rules, "10.3.9.9") == "10.3."
    assert key_of(rules, "10.4.9.9") is None


def test_range_bounds_as_tcprules_reads_them() -> None:
    rules = Rules.parse("1.2.3.-2:deny\n1.2.4.250-999:deny\n1.2.5.007-8:deny\n")
    assert {rule.key for rule in rules} == {
        *(f"1.2.3.{n}" for n in range(3)),  # an empty bound is 0
        *(f"1.2.4.{n}" for n in range(250, 256)),  # the top is capped at 255
        "1.2.5.7",  # numbers are written without leading zeros
        "1.2.5.8",
    }


def test_backwards_range_is_empty_and_noted() -> None:
    rules = Rules.parse("1.2.3.9-5:deny\n", "r")
    assert len(rules) == 0
    assert rules.warnings == ("r:1: range '1.2.3.9-5' is empty: no address matches it",)


def test_only_the_first_dash_is_a_range() -> None:
    with pytest.raises(RulesError, match="'3-5' is not a number"):
        Rules.parse("1.2.3.1-3-5:deny\n")


def test_dashes_in_host_and_info_keys_are_not_ranges() -> None:
    rules = Rules.parse("=mail-gw.example.com:deny\nmail-user@10.0.0.1-3:deny\n")
    assert key_of(rules, "9.9.9.9", host="mail-gw.example.com") == "=mail-gw.example.com"
    assert {rule.key for rule in rules} == {"=mail-gw.example.com", "mail-user@10.0.0.1-3"}
    assert key_of(rules, "10.0.0.2", info="mail-user") is None


def test_host_rules() -> None:
    rules = Rules.parse(
        '=host.example.com:allow,A="host"\n=.example.com:deny\n=.com:allow\n=:allow\n:deny\n'
    )
    assert key_of(rules, "1.1.1.1", host="host.example.com") == "=host.example.com"
    assert key_of(rules, "1.1.1.1", host="a.b.example.com") == "=.example.com"
    assert key_of(rules, "1.1.1.1", host="other.com") == "=.com"
    assert key_of(rules, "1.1.1.1", host="other.org") == "="
    assert key_of(rules, "1.1.1.1") == ""  # no host name: no '=' rule applies


def test_host_names_compare_in_lower_case() -> None:
    rules = Rules.parse("=host.example.com:deny\n=Upper.example.com:deny\n", "r")
    assert key_of(rules, "1.1.1.1", host="HOST.Example.COM.") == "=host.example.com"
    # tcpserver's DNS names are lower case, so this key is dead there and here
    assert key_of(rules, "1.1.1.1", host="upper.example.com") is None
    assert rules.warnings == (
        "r:2: key '=Upper.example.com' never matches: host names are looked up in lower case",
    )


def test_empty_key_is_the_default() -> None:
    rules = Rules.parse(":deny\n")
    assert verdict(rules.match("203.0.113.9")) == ("", False, {})


def test_info_keys() -> None:
    rules = Rules.parse('joe@127.0.0.1:deny\njoe@=host.example.com:allow,WHO="joe"\n127.:allow\n')
    assert key_of(rules, "127.0.0.1", info="joe") == "joe@127.0.0.1"
    assert key_of(rules, "127.0.0.1", info="bill") == "127."
    assert key_of(rules, "127.0.0.1") == "127."
    assert key_of(rules, "127.0.0.2", host="host.example.com", info="joe") == (
        "joe@=host.example.com"
    )


@pytest.mark.parametrize(
    ("instructions", "env"),
    [
        ('allow,X="a,b=c"', {"X": "a,b=c"}),
        ("allow,X='single'", {"X": "single"}),
        ("allow,X=/@fix.me/", {"X": "@fix.me"}),
        ("allow,X=\"say 'hi'\"", {"X": "say 'hi'"}),
        ("allow,X=xabcx", {"X": "abc"}),  # the character after '=' is the quote
        ('allow,X=""', {"X": ""}),
        ('allow,X="1",X="2"', {"X": "2"}),  # set in order: the last one stays
        ('allow,A="1",B=:2:,C="x y"', {"A": "1", "B": "2", "C": "x y"}),
        ('allow,A,B="x"', {"A,B": "x"}),  # the name runs to the first '='
        ("allow  \t", {}),  # trailing blanks are dropped
    ],
)
def test_variable_quoting(instructions: str, env: dict[str, str]) -> None:
    rule = Rules.parse(f"1.2.3.4:{instructions}\n").match("1.2.3.4")
    assert rule is not None
    assert dict(rule.env) == env


def test_comments_blank_lines_and_lines_without_colon() -> None:
    text = "# a comment: with a colon\n\n127.0.0.1:allow\nno colon here\n:deny"
    rules = Rules.parse(text, "r")
    assert key_of(rules, "127.0.0.1") == "127.0.0.1"
    assert key_of(rules, "10.0.0.1") == ""  # the last line needs no newline
    assert rules.warnings == ("r:4: no ':' in this line; tcprules ignores it",)


def test_leading_blanks_make_a_dead_key() -> None:
    rules = Rules.parse(" 1.2.3.4:deny\n\t# not a comment\n", "r")
    assert key_of(rules, "1.2.3.4") is None
    assert rules.warnings[0] == "r:1: key ' 1.2.3.4' starts with white space and never matches"


# -- precedence --------------------------------------------------------------

PRECEDENCE = """\
joe@10.1.2.3:allow,S="info@ip"
joe@=h.example.com:allow,S="info@=host"
10.1.2.3:allow,S="ip"
=h.example.com:allow,S="=host"
10.1.2.:allow,S="prefix3"
10.1.:allow,S="prefix2"
10.:allow,S="prefix1"
=.b.example.com:allow,S="suffix long"
=.example.com:allow,S="suffix short"
=:allow,S="="
:allow,S="empty"
"""


@pytest.mark.parametrize(
    ("ip", "host", "info", "step"),
    [
        ("10.1.2.3", "h.example.com", "joe", "info@ip"),
        ("10.1.2.4", "h.example.com", "joe", "info@=host"),
        ("10.1.2.3", "h.example.com", "bill", "ip"),
        ("10.1.2.3", None, "joe", "info@ip"),
        ("10.1.2.4", "h.example.com", None, "=host"),
        ("10.1.2.4", "x.b.example.com", None, "prefix3"),  # ip prefixes before suffixes
        ("10.1.9.9", None, None, "prefix2"),
        ("10.9.9.9", None, None, "prefix1"),
        ("11.0.0.1", "x.b.example.com", None, "suffix long"),
        ("11.0.0.1", "x.example.com", None, "suffix short"),
        ("11.0.0.1", "example.com", None, "="),  # the suffix must start with a dot
        ("11.0.0.1", "elsewhere.org", None, "="),
        ("11.0.0.1", None, "joe", "empty"),
    ],
)
def test_lookup_order(ip: str, host: str | None, info: str | None, step: str) -> None:
    rule = Rules.parse(PRECEDENCE).match(ip, host, info)
    assert rule is not None
    assert rule.env["S"] == step


def test_first_line_wins_for_a_repeated_key() -> None:
    rules = Rules.parse('1.2.3.4:allow,N="1"\n1.2.3.4:deny\n1.2.3.1-9:deny\n', "r")
    assert verdict(rules.match("1.2.3.4")) == ("1.2.3.4", True, {"N": "1"})
    assert rules.warnings == (
        "r:2: repeats '1.2.3.4' (first at r:1); the first line wins, this one is unused",
        "r:3: repeats '1.2.3.4' (first at r:1); the first line wins, this one is unused",
    )
    assert key_of(rules, "1.2.3.5") == "1.2.3.5"


def test_a_range_before_an_exact_key_wins() -> None:
    rules = Rules.parse('1.2.3.1-5:allow,X="range"\n1.2.3.4:allow,X="exact"\n')
    assert verdict(rules.match("1.2.3.4")) == ("1.2.3.4", True, {"X": "range"})


def test_iteration_is_in_file_order() -> None:
    rules = Rules.parse(":deny\n10.0.0.0/8:deny\n127.:allow\n")
    assert [rule.key for rule in rules] == ["", "10.0.0.0/8", "127."]


# -- errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1.2.3.4:", "must begin with 'allow' or 'deny'"),
        ("1.2.3.4:Allow", "must begin with 'allow' or 'deny'"),
        ("1.2.3.4:permit", "must begin with 'allow' or 'deny'"),
        ("1.2.3.4:allowx", "unexpected 'x'"),
        ('1.2.3.4:allow ,X="1"', "unexpected ' ,X=\"1\"'"),
        ('1.2.3.4:allow,X="1" ,Y="2"', "unexpected"),
        ("1.2.3.4:allow,X", 'has no "="'),
        ('1.2.3.4:allow,X="1",', 'has no "="'),
        ("1.2.3.4:allow,X=", "no value after"),
        ("1.2.3.4:allow,X=value", "does not close"),
        ('1.2.3.4:allow,X="open', "does not close"),
        ('1.2.3.4:allow,X="a"junk', "unexpected 'junk'"),
        ('1.2.3.4:allow,="v"', "empty variable name"),
        ("1.2.3.4:deny:more", "unexpected ':more'"),
        ("1.2.3.x-9:deny", "'x' is not a number"),
        ("1.2.3.1-9x:deny", "'9x' is not a number"),
        ("10.0.0.0/33:deny", "is not a network"),
        ("1.2.3.4:allow\r", "ends in CR"),
    ],
)
def test_malformed_lines_name_file_and_line(line: str, message: str) -> None:
    text = f"# rules\n127.:allow\n{line}\n:deny\n"
    with pytest.raises(RulesError) as info:
        Rules.parse(text, "/etc/tcp.smtp")
    assert str(info.value).startswith("/etc/tcp.smtp:3: ")
    assert message in str(info.value)
    assert (info.value.path, info.value.line) == ("/etc/tcp.smtp", 3)


def test_crlf_file_fails_on_its_first_rule() -> None:
    with pytest.raises(RulesError, match=r"^r:2: .*ends in CR"):
        Rules.parse("# made on Windows\r\n127.:allow\r\n", "r")


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "tcp.smtp"
    path.write_bytes(b'127.:allow,RELAYCLIENT=""\n:allow,NAME="caf\xc3\xa9 \xff"\n')
    rules = Rules.load(path)
    assert rules.path == str(path)
    rule = rules.match("127.0.0.1")
    assert rule is not None
    assert rule.source == f"{path}:1"
    default = rules.match("8.8.8.8")
    assert default is not None
    # bytes that are not UTF-8 reach the environment unchanged
    assert os.fsencode(default.env["NAME"]) == b"caf\xc3\xa9 \xff"


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=r"missing: cannot read: No such file"):
        Rules.load(tmp_path / "missing")
    cdb = tmp_path / "tcp.smtp.cdb"
    cdb.write_bytes(b"\0" * 2048 + b"127.")
    with pytest.raises(RulesError, match=r"tcp\.smtp\.cdb: is binary, a compiled \.cdb"):
        Rules.load(cdb)
    bad = tmp_path / "bad"
    bad.write_text("127.:allow\n:maybe\n")
    with pytest.raises(RulesError, match=rf"^{bad}:2: "):
        Rules.load(bad)


def test_match_wants_an_ip_address() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        Rules.parse(":allow\n").match("mail.example.com")


# -- IPv6 --------------------------------------------------------------------
# The form of Debian's ucspi-tcp-ipv6: compressed lower-case text, prefixes
# end with ':', and the key ends at the first ':' followed by allow/deny.


def test_ipv6_exact_keys() -> None:
    rules = Rules.parse('::1:allow,RELAYCLIENT=""\n2001:db8::25:deny,X="a:b"\n:deny\n')
    assert verdict(rules.match("::1")) == ("::1", True, {"RELAYCLIENT": ""})
    assert rules.match("2001:db8::25") == Rule(False, {"X": "a:b"}, "2001:db8::25", "<rules>:2")
    # the client address is compared in its compressed form
    assert key_of(rules, "2001:0DB8:0:0:0:0:0:25") == "2001:db8::25"
    assert key_of(rules, "::2") == ""


def test_ipv6_textual_prefixes_longest_first() -> None:
    rules = Rules.parse('2001:db8::allow,P="32"\n2001:db8:1::allow,P="48"\n')
    assert {rule.key for rule in rules} == {"2001:db8:", "2001:db8:1:"}
    assert dict(rules.match("2001:db8:1::9").env) == {"P": "48"}  # type: ignore[union-attr]
    assert dict(rules.match("2001:db8:2::9").env) == {"P": "32"}  # type: ignore[union-attr]
    assert dict(rules.match("2001:db8::9").env) == {"P": "32"}  # type: ignore[union-attr]
    assert rules.match("2001:db9::9") is None


def test_ipv4_mapped_clients_are_looked_up_as_ipv4() -> None:
    rules = Rules.parse('127.:allow,RELAYCLIENT=""\n::ffff:127.0.0.1:deny\n', "r")
    assert verdict(rules.match("::ffff:127.0.0.1")) == ("127.", True, {"RELAYCLIENT": ""})
    assert rules.warnings == (
        "r:2: key '::ffff:127.0.0.1' never matches: IPv4-mapped clients are looked up as IPv4",
    )


def test_uncompressed_ipv6_key_is_dead_and_noted() -> None:
    rules = Rules.parse("2001:DB8:0:0::1:deny\n", "r")
    assert rules.match("2001:db8::1") is None
    assert rules.warnings == (
        "r:1: key '2001:DB8:0:0::1' never matches: write it as '2001:db8::1'",
    )


def test_ipv6_scope_is_ignored() -> None:
    rules = Rules.parse("fe80::1:deny\n")
    assert key_of(rules, "fe80::1%eth0") == "fe80::1"


def test_cidr_keys_ipv4_and_ipv6() -> None:
    rules = Rules.parse(
        '10.0.0.0/8:allow,N="8"\n'
        '10.1.0.0/16:allow,N="16"\n'
        '10.1.2.:allow,N="24 textual"\n'
        '10.1.2.128/25:allow,N="25"\n'
        '2001:db8::/32:allow,N="v6/32"\n'
        '2001:db8:ff00::/40:allow,N="v6/40"\n'
        "172.16.5.5/12:deny\n"  # host bits are dropped, as ucspi-tcp6 does
    )
    cases = {
        "10.9.9.9": "8",
        "10.1.9.9": "16",
        "10.1.2.3": "24 textual",
        "10.1.2.200": "25",
        "2001:db8::1": "v6/32",
        "2001:db8:ff12::1": "v6/40",
    }
    for ip, n in cases.items():
        rule = rules.match(ip)
        assert rule is not None
        assert rule.env["N"] == n, ip
    assert key_of(rules, "172.31.0.1") == "172.16.0.0/12"
    assert key_of(rules, "11.0.0.1") is None


def test_equal_prefixes_go_to_the_earlier_line() -> None:
    first_cidr = Rules.parse('10.1.2.0/24:allow,W="cidr"\n10.1.2.:allow,W="text"\n')
    first_text = Rules.parse('10.1.2.:allow,W="text"\n10.1.2.0/24:allow,W="cidr"\n')
    assert first_cidr.match("10.1.2.3").env["W"] == "cidr"  # type: ignore[union-attr]
    assert first_text.match("10.1.2.3").env["W"] == "text"  # type: ignore[union-attr]


def test_exact_and_host_rules_beat_cidr() -> None:
    rules = Rules.parse("10.0.0.0/8:deny\n10.0.0.1:allow\n=ok.example.com:allow\n")
    assert key_of(rules, "10.0.0.1") == "10.0.0.1"
    assert key_of(rules, "10.0.0.2", host="ok.example.com") == "=ok.example.com"
    assert key_of(rules, "10.0.0.2") == "10.0.0.0/8"


# -- relay check -------------------------------------------------------------


def test_relay_granted() -> None:
    rules = Rules.parse(
        '127.0.0.2:deny,RELAYCLIENT=""\n127.:allow,RELAYCLIENT=""\n'
        '=localhost:allow,RELAYCLIENT=""\n10.:allow\n::1:allow,RELAYCLIENT=""\n'
    )
    granted = rules.relay_granted("127.0.0.1")
    assert granted is not None
    assert (granted.key, granted.source) == ("127.", "<rules>:2")
    assert rules.relay_granted("127.0.0.2") is None  # denied: never gets that far
    assert rules.relay_granted("10.0.0.1") is None
    assert rules.relay_granted("10.0.0.1", host="localhost") is not None
    assert rules.relay_granted("::1") is not None
    assert Rules.parse("").relay_granted("127.0.0.1") is None


# -- the real tcprules -------------------------------------------------------

TCPRULES = shutil.which("tcprules")
TCPRULESCHECK = shutil.which("tcprulescheck")
needs_ucspi = pytest.mark.skipif(
    (TCPRULES is None or TCPRULESCHECK is None) and not os.environ.get("CI"),
    reason="ucspi-tcp (tcprules, tcprulescheck) is not installed",
)


def ucspi_compile(text: str, directory: Path) -> Path | None:
    """Compile with tcprules; None if it refuses the text."""
    assert TCPRULES is not None, "ucspi-tcp must be installed in CI"
    cdb = directory / "rules.cdb"
    cdb.unlink(missing_ok=True)
    try:
        done = subprocess.run(
            [TCPRULES, str(cdb), str(directory / "rules.tmp")],
            input=text.encode("utf-8", "surrogateescape"),
            capture_output=True,
            timeout=10,
            check=False,
        )
    except subprocess.TimeoutExpired:  # the IPv6 variant loops on some bad lines
        return None
    return cdb if done.returncode == 0 else None


def ucspi_verdict(
    cdb: Path, ip: str, host: str | None, info: str | None
) -> tuple[str | None, bool, dict[str, str]]:
    assert TCPRULESCHECK is not None
    env = {"TCPREMOTEIP": ip}
    if host is not None:
        env["TCPREMOTEHOST"] = host
    if info is not None:
        env["TCPREMOTEINFO"] = info
    out = subprocess.run(
        [TCPRULESCHECK, str(cdb)], env=env, capture_output=True, text=True, timeout=10, check=True
    ).stdout.splitlines()
    key = None if out[0] == "default:" else out[0].removeprefix("rule ").removesuffix(":")
    variables = {}
    for line in out[1:-1]:
        name, _, value = line.removeprefix("set environment variable ").partition("=")
        variables[name] = value
    assert out[-1] in ("allow connection", "deny connection")
    return key, out[-1] == "allow connection", variables


QUERIES = [
    ("10.0.0.1", None, None),
    ("10.0.0.2", "a.example.com", None),
    ("10.0.1.3", None, "joe"),
    ("10.0.0.4", "a.example.com", "joe"),
    ("10.1.0.1", "b.example.org", None),
    ("10.1.2.250", None, None),
    ("192.0.2.1", "x.a.example.com", "bob"),
    ("192.0.2.255", None, None),
]

CORPUS = r"""# a file such as a qmail host keeps
127.:allow,RELAYCLIENT=""
10.0.0.1-3:allow,RELAYCLIENT="",RBLSMTPD=""
10.0.0.2:deny
10.1-2.:allow,X='one,two=three'
10.1.2.250-300:deny,WHY=/no more/
joe@10.0.1.3:allow,WHO="joe"
joe@=a.example.com:allow,WHO=:joe@host:
=a.example.com:allow,H="a"
=.example.com:allow,H="suffix"
=.example.org:deny
=:allow,H="any"
192.0.2.-3:deny
 192.0.2.1:deny
no colon, skipped
:allow,DEFAULT="yes"
"""


@needs_ucspi
def test_corpus_matches_tcprulescheck(tmp_path: Path) -> None:
    cdb = ucspi_compile(CORPUS, tmp_path)
    assert cdb is not None
    rules = Rules.parse(CORPUS)
    for ip, host, info in QUERIES:
        assert verdict(rules.match(ip, host, info)) == ucspi_verdict(cdb, ip, host, info), ip


_quotes = st.sampled_from(['"', "'", "/", ":", "x"])
_values = st.text(alphabet="ab ,=@.-", max_size=6)
_assignments = st.lists(
    st.tuples(st.sampled_from(["A", "B", "RELAYCLIENT"]), _quotes, _values).filter(
        lambda t: t[1] not in t[2]
    ),
    max_size=3,
)
_keys = st.sampled_from(
    [
        *("10.0.0.1", "10.0.0.2", "10.0.1.3", "10.1.0.1", "192.0.2.1"),
        *("10.", "10.0.", "10.0.1.", "10.1.", "192.0.", "192."),
        *("10.0.0.1-3", "10.0-1.", "10.0.0.-2", "192.0.2.0-255", "10.1.0.5-1"),
        *("=a.example.com", "=.example.com", "=.com", "=.org", "=", ""),
        *("joe@10.0.0.4", "joe@=a.example.com", "bob@192.0.2.1", "mail-x@10.0.0.1"),
    ]
)
_good_line = st.builds(
    lambda key, word, assignments: (
        key
        + ":"
        + word
        + "".join(f",{name}={quote}{value}{quote}" for name, quote, value in assignments)
    ),
    _keys,
    st.sampled_from(["allow", "deny"]),
    _assignments,
)
# lines near the valid ones, often wrong; never ':' past the first and never
# ',=' (an empty variable name, which tlsfront alone refuses)
_odd_line = st.builds(
    lambda key, word, pieces: f"{key}:{word}{''.join(pieces)}",
    st.one_of(_keys, st.text(alphabet="10.-=x@ ", max_size=8)),
    st.sampled_from(["allow", "deny", "Allow", "", "permit", "allow ", "deny\t"]),
    st.lists(
        st.sampled_from(
            [
                *(',A="x"', ",A=x", ",A", ",A=", ' ,A="1"', "\t", " ", "\r", ",A='1'"),
                *("junk", ',A="1', ",B=//", ',A="a,b"', ",", "=", '"'),
            ]
        ),
        max_size=4,
    ),
).filter(lambda line: ",=" not in line)
_files = st.lists(st.one_of(_good_line, _good_line, _good_line, st.just("# c")), max_size=8)


def check_against_tcprules(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        cdb = ucspi_compile(text, Path(directory))
        try:
            rules = Rules.parse(text)
        except RulesError:
            event("refused")
            assert cdb is None, f"tcprules took what tlsfront refused:\n{text}"
            return
        event("accepted")
        assert cdb is not None, f"tlsfront took what tcprules refused:\n{text}"
        for ip, host, info in QUERIES:
            ours = verdict(rules.match(ip, host, info))
            assert ours == ucspi_verdict(cdb, ip, host, info), (text, ip, host, info)


@needs_ucspi
@settings(max_examples=150, deadline=None, database=None)
@given(_files)
def test_random_files_match_tcprules(lines: list[str]) -> None:
    check_against_tcprules("".join(line + "\n" for line in lines))


@needs_ucspi
@settings(max_examples=150, deadline=None, database=None)
@given(_files, _odd_line, st.integers(min_value=0))
def test_odd_lines_are_refused_as_tcprules_does(lines: list[str], odd: str, where: int) -> None:
    lines.insert(where % (len(lines) + 1), odd)
    check_against_tcprules("".join(line + "\n" for line in lines))
