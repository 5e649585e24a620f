"""The wire protocol, tested with bytes alone (no sockets, no event loop).

docs/protocol.md is the specification: this module parses it, finds every
test vector and checks it byte for byte against ``encode_frame`` and
``FrameDecoder``, and checks that its tables (error codes, limits, name
patterns, frame types, the welcome example) match the code. Edit either and
the other must follow.
"""

from __future__ import annotations

import json
import random
import re
import string
import struct
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import libchat
from libchat import protocol
from libchat.errors import BadRequest, FrameTooLarge, InvalidName, ProtocolError, error_codes
from libchat.limits import Limits
from libchat.protocol import (
    MAX_HEADER_SIZE,
    Frame,
    FrameDecoder,
    check_nick,
    check_room,
    check_text,
    encode_frame,
    encode_header,
    fold,
    parse_header,
)
from libchat.session import Session

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
DOC = DOC_PATH.read_text(encoding="utf-8")

# -- reading the specification ----------------------------------------------------------

_BLOCK = re.compile(r"^```(vector|reject) ([^\n]*)\n(.*?)^```$", re.M | re.S)
_DUMP_LINE = re.compile(r"([0-9a-f]{8}): (.{39})  (.*)")


@dataclass(frozen=True)
class Vector:
    name: str
    header_text: str
    body: bytes
    dump: list[str]


@dataclass(frozen=True)
class Reject:
    name: str
    code: str
    dump: list[str]


def hexdump(data: bytes) -> list[str]:
    """``xxd -g2`` layout: offset, eight 2-byte groups, printable ASCII."""
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset : offset + 16]
        groups = " ".join(chunk[i : i + 2].hex() for i in range(0, len(chunk), 2))
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{offset:08x}: {groups:<39}  {text}")
    return lines


def undump(lines: list[str]) -> bytes:
    """The bytes of a hex dump, checking that every offset is where it says."""
    data = bytearray()
    for line in lines:
        match = _DUMP_LINE.fullmatch(line)
        assert match, f"not a hex dump line: {line!r}"
        assert int(match[1], 16) == len(data), f"wrong offset in {line!r}"
        data += bytes.fromhex(match[2].replace(" ", ""))
    return bytes(data)


def _info(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split())


def _vectors() -> list[Vector]:
    found = []
    for match in _BLOCK.finditer(DOC):
        if match[1] != "vector":
            continue
        lines = match[3].splitlines()
        assert lines[0].startswith("header: "), lines[0]
        assert lines[1].startswith("body-hex:"), lines[1]
        body = bytes.fromhex(lines[1].removeprefix("body-hex:").strip())
        found.append(Vector(_info(match[2])["name"], lines[0][8:], body, lines[2:]))
    return found


def _rejects() -> list[Reject]:
    found = []
    for match in _BLOCK.finditer(DOC):
        if match[1] == "reject":
            info = _info(match[2])
            found.append(Reject(info["name"], info["code"], match[3].splitlines()))
    return found


VECTORS = _vectors()
REJECTS = _rejects()


def _section(title: str) -> str:
    """The text of the doc section whose heading starts with ``title``."""
    match = re.search(rf"^(#+) {re.escape(title)}.*?$(.*?)(?=^#{{1,2}} |\Z)", DOC, re.M | re.S)
    assert match, f"docs/protocol.md has no section {title!r}"
    return match[2]


def _table_column(text: str) -> list[str]:
    """The backticked first cells of a markdown table's rows."""
    return re.findall(r"^\| `([^`]+)`", text, re.M)


# -- the vectors in the doc ---------------------------------------------------------------


def test_doc_holds_the_required_vectors() -> None:
    names = [v.name for v in VECTORS]
    assert len(names) == len(set(names)), "vector names must be unique"
    assert {"hello", "msg-request", "binary-body"} <= set(names)
    assert any(not v.header_text.isascii() for v in VECTORS), "a vector with non-ASCII text"
    assert any(v.body for v in VECTORS), "a vector with a binary body"
    reject_names = [r.name for r in REJECTS]
    assert len(reject_names) == len(set(reject_names))
    assert {r.code for r in REJECTS} == {"protocol_error", "frame_too_large"}
    # Nothing that looks like a vector was left out by the parser.
    assert DOC.count("```vector ") == len(VECTORS)
    assert DOC.count("```reject ") == len(REJECTS)


@pytest.mark.parametrize("vector", VECTORS, ids=[v.name for v in VECTORS])
def test_vector_encodes_byte_for_byte(vector: Vector) -> None:
    header = json.loads(vector.header_text)
    # The header line is the canonical encoding itself, not just equal JSON.
    assert encode_header(header) == vector.header_text.encode("utf-8")
    data = encode_frame(header, vector.body)
    assert undump(vector.dump) == data
    # Offsets and the ASCII column too, so the dump stays readable and true.
    assert [line.rstrip() for line in vector.dump] == [line.rstrip() for line in hexdump(data)]


@pytest.mark.parametrize("vector", VECTORS, ids=[v.name for v in VECTORS])
def test_vector_decodes_to_its_header_and_body(vector: Vector) -> None:
    data = undump(vector.dump)
    expected = Frame(json.loads(vector.header_text), vector.body)
    assert FrameDecoder().feed(data) == [expected]
    decoder = FrameDecoder()
    out = [frame for i in range(len(data)) for frame in decoder.feed(data[i : i + 1])]
    assert out == [expected]
    assert decoder.buffered == 0
    (frame,) = out
    assert frame.body == vector.body  # Frame equality skips nothing, but be explicit
    assert frame.type == expected.header["type"]


@pytest.mark.parametrize("reject", REJECTS, ids=[r.name for r in REJECTS])
def test_reject_vector_is_refused_with_its_code(reject: Reject) -> None:
    data = undump(reject.dump)
    with pytest.raises(ProtocolError) as raised:
        FrameDecoder(max_frame_size=Limits().max_frame_size).feed(data)
    assert raised.value.code == reject.code
    # Fed byte by byte, it is refused by the last byte at the latest.
    decoder = FrameDecoder(max_frame_size=Limits().max_frame_size)
    with pytest.raises(ProtocolError) as raised:
        for i in range(len(data)):
            decoder.feed(data[i : i + 1])
    assert raised.value.code == reject.code


# -- the doc's tables against the code ------------------------------------------------------


def test_doc_lists_every_error_code() -> None:
    assert set(_table_column(_section("5. Errors"))) == set(error_codes())


def test_doc_lists_every_limit_with_its_default() -> None:
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \|([^|]*)\|", _section("7. Limits"), re.M)
    documented = {name: default.strip() for name, _type, default in rows}
    fixed = {
        "max_list_items": protocol.MAX_LIST_ITEMS,
        "max_reason_chars": protocol.MAX_REASON_CHARS,
    }
    assert list(documented) == [*Limits.names(), *fixed, "nick", "room"]
    for name, value in {**Limits().as_dict(), **fixed}.items():
        assert documented[name] == str(value), f"default of {name}"


def test_doc_name_patterns_are_the_codes() -> None:
    names = _section("6. Names and text")
    assert f"`{protocol._NICK_RE.pattern}`" in names
    assert f"`{protocol._ROOM_RE.pattern}`" in names
    assert f"room is `{protocol.DEFAULT_ROOM}`" in names


def test_doc_describes_every_core_frame_type() -> None:
    client_types = sorted(name[3:] for name in dir(Session) if name.startswith("on_"))
    assert client_types, "Session lost its on_* handlers?"
    to_server = _section("4.1 Client to server")
    for kind in client_types:
        assert f"**`{kind}`**" in to_server, kind
    to_client = _section("4.2 Server to client")
    for kind in ("welcome", "ok", "error", "msg", "presence", "notice", "ping", "pong", "bye"):
        assert f"**`{kind}`**" in to_client, kind
    assert "**`dm`**" in _section("4.3 Plugin frames")


def test_doc_welcome_example_is_what_the_server_sends() -> None:
    blocks = re.findall(r"^```json\n(.*?)^```$", _section("4.2 Server to client"), re.M | re.S)
    (example,) = [json.loads(b) for b in blocks if '"welcome"' in b]
    server = libchat.Server("127.0.0.1", 0)
    welcome = server.welcome(SimpleNamespace(name="alice"))  # type: ignore[arg-type]
    assert welcome.pop("server").startswith("libchat/")
    assert example.pop("server").startswith("libchat/")
    assert example == welcome
    assert list(example) == list(welcome), "the example keeps the canonical key order"


# -- decoding: however the stream is split --------------------------------------------------

SAMPLE = [
    Frame({"type": "hello", "version": 1, "user": "alice"}),
    Frame({"type": "msg", "room": "lobby", "text": "héllo 👋", "id": 1}),
    Frame({"type": "blob"}, bytes(range(256)) + b"LC\x00\x00"),
    Frame({"type": "ping"}),
]
SAMPLE_BYTES = b"".join(encode_frame(f.header, f.body) for f in SAMPLE)


def test_many_frames_in_one_chunk() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(SAMPLE_BYTES) == SAMPLE
    assert decoder.buffered == 0


def test_received_bytes_are_decoded_one_frame_at_a_time() -> None:
    # The server keeps a backlog as bytes and decodes a frame only when its
    # session takes one: a flood of tiny frames costs its size, no more.
    decoder = FrameDecoder()
    decoder.receive_data(SAMPLE_BYTES + SAMPLE_BYTES[:5])
    assert decoder.buffered == len(SAMPLE_BYTES) + 5
    sizes = [len(encode_frame(f.header, f.body)) for f in SAMPLE]
    left = decoder.buffered
    for frame, size in zip(SAMPLE, sizes, strict=True):
        assert decoder.ready()
        assert decoder.next_frame() == frame
        left -= size
        assert decoder.buffered == left
    assert not decoder.ready() and decoder.next_frame() is None
    decoder.receive_data(SAMPLE_BYTES[5:])  # completes the partial frame
    assert decoder.buffered == len(SAMPLE_BYTES)
    assert decoder.next_frame() == SAMPLE[0]


def test_ready_reports_an_error_waiting_to_be_raised() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    decoder.receive_data(encode_frame({"type": "ping"}) + _prefix(50, 51))
    assert decoder.next_frame() == Frame({"type": "ping"})
    # only the prefix of a frame too large: refused without waiting for it
    assert decoder.ready()
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()
    assert decoder.buffered == 0 and decoder.ready()
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.receive_data(b"more")
    plain = FrameDecoder()
    plain.receive_data(b"h")
    assert plain.ready()
    with pytest.raises(ProtocolError, match="plain text"):
        plain.next_frame()


def test_byte_by_byte_each_frame_completes_on_its_last_byte() -> None:
    ends = []
    total = 0
    for frame in SAMPLE:
        total += len(encode_frame(frame.header, frame.body))
        ends.append(total)
    decoder = FrameDecoder()
    for i in range(len(SAMPLE_BYTES)):
        out = decoder.feed(SAMPLE_BYTES[i : i + 1])
        if i + 1 in ends:
            assert out == [SAMPLE[ends.index(i + 1)]]
            assert decoder.buffered == 0
        else:
            assert out == []
            assert decoder.buffered > 0


def test_every_split_point() -> None:
    for cut in range(len(SAMPLE_BYTES) + 1):
        decoder = FrameDecoder()
        frames = decoder.feed(SAMPLE_BYTES[:cut]) + decoder.feed(SAMPLE_BYTES[cut:])
        assert frames == SAMPLE, cut


def test_empty_feed_is_harmless() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(SAMPLE_BYTES[:5]) == []
    assert decoder.feed(b"") == []
    assert decoder.feed(SAMPLE_BYTES[5:]) == SAMPLE


def test_header_that_is_not_canonical_is_accepted() -> None:
    raw = ' \r\n{ "id" : "1" ,\t"type" : "m\\u0073g" , "text" : "\\u00e9\\ud83d\\ude00" } '
    data = raw.encode()
    frame = b"LC" + struct.pack(">HI", len(data), 0) + data
    (decoded,) = FrameDecoder().feed(frame)
    assert decoded.header == {"id": "1", "type": "msg", "text": "é😀"}
    assert decoded.type == "msg"


# -- decoding: limits on the declared lengths -----------------------------------------------


def _prefix(hlen: int, blen: int, magic: bytes = b"LC") -> bytes:
    return magic + struct.pack(">HI", hlen, blen)


def test_oversized_frame_is_refused_on_its_prefix_alone() -> None:
    decoder = FrameDecoder(max_frame_size=1000)
    assert decoder.feed(_prefix(15, 0xFFFFFFFF)[:7]) == []
    with pytest.raises(FrameTooLarge, match="limit is 1000") as raised:
        decoder.feed(_prefix(15, 0xFFFFFFFF)[7:])
    assert raised.value.code == "frame_too_large"
    assert isinstance(raised.value, ProtocolError)
    assert decoder.buffered == 0


def test_limit_counts_header_plus_body() -> None:
    header = {"type": "blob"}
    hlen = len(encode_header(header))
    exact = encode_frame(header, b"x" * (100 - hlen))
    assert FrameDecoder(max_frame_size=100).feed(exact) == [Frame(header, b"x" * (100 - hlen))]
    with pytest.raises(FrameTooLarge):
        FrameDecoder(max_frame_size=99).feed(exact[:8])
    # A header alone can be too large too.
    with pytest.raises(FrameTooLarge):
        FrameDecoder(max_frame_size=99).feed(_prefix(100, 0))


def test_no_limit_with_none() -> None:
    body = b"\xab" * (2 << 20)
    data = encode_frame({"type": "blob"}, body)
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(data[:8])  # the default limit is 1 MiB
    assert FrameDecoder(max_frame_size=None).feed(data) == [Frame({"type": "blob"}, body)]


# -- decoding: bad bytes --------------------------------------------------------------------


def _fails(data: bytes, match: str) -> ProtocolError:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match=match) as raised:
        decoder.feed(data)
    assert raised.value.code == "protocol_error"
    # A failed decoder is unusable: the stream can no longer be trusted.
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(encode_frame({"type": "ping"}))
    assert decoder.buffered == 0
    return raised.value


def _framed(raw: bytes) -> bytes:
    return _prefix(len(raw), 0) + raw


def test_bad_magic_hints_at_tls() -> None:
    error = _fails(bytes.fromhex("16030100a5010000a103"), "bad magic")
    assert "TLS" in error.message


def test_bad_magic_hints_at_plain_text() -> None:
    error = _fails(b"GET / HTTP/1.1\r\n", "bad magic")
    assert "plain text" in error.message


def test_bad_magic_without_a_hint() -> None:
    error = _fails(b"\x00\x01" + _prefix(1, 0)[2:], "bad magic")
    assert "TLS" not in error.message
    assert "plain text" not in error.message


def test_bad_magic_is_seen_before_a_whole_prefix() -> None:
    # Someone typing "hi" and Enter must not wait for a handshake timeout.
    _fails(b"hi\r\n", "plain text")
    _fails(b"\x16", "TLS")
    _fails(b"LX", "bad magic")
    decoder = FrameDecoder()
    assert decoder.feed(b"L") == []
    assert decoder.feed(b"C") == []
    assert decoder.buffered == 2


def test_bad_magic_after_a_good_frame() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame({"type": "ping"})) == [Frame({"type": "ping"})]
    with pytest.raises(ProtocolError, match="bad magic"):
        decoder.feed(b"XX")


def test_zero_header_length() -> None:
    _fails(_prefix(0, 0), "header length is zero")
    _fails(_prefix(0, 5) + b"hello", "header length is zero")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type":"\xff"}',
        b'{"type":"caf\xc3"}',  # truncated two-byte sequence
        b'{"type":"\xc0\xaf"}',  # overlong "/"
        b'{"type":"\xed\xa0\x80"}',  # a surrogate encoded as UTF-8
        b'{"type":"\xf4\x90\x80\x80"}',  # beyond U+10FFFF
    ],
    ids=["ff", "truncated", "overlong", "surrogate", "too-high"],
)
def test_invalid_utf8(raw: bytes) -> None:
    _fails(_framed(raw), "not valid UTF-8")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type":"x"',
        b'{"type":"x",}',
        b"{'type':'x'}",
        b'{"type":"x"} {}',
        b'\xef\xbb\xbf{"type":"x"}',  # a byte order mark
        b'{"type":"a\nb"}',  # a raw control character in a string
    ],
    ids=["unterminated", "trailing-comma", "single-quotes", "two-values", "bom", "raw-newline"],
)
def test_invalid_json(raw: bytes) -> None:
    _fails(_framed(raw), "not valid JSON")


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_numbers(number: str) -> None:
    # Accepting 1e400 would hand the server an ``inf`` it cannot echo back.
    _fails(_framed(b'{"type":"x","id":%s}' % number.encode()), "not valid JSON")


@pytest.mark.parametrize("raw", [b"[]", b'"msg"', b"1", b"null", b"true", b'["type","msg"]'])
def test_header_must_be_an_object(raw: bytes) -> None:
    _fails(_framed(raw), "must be a JSON object")


@pytest.mark.parametrize(
    "raw",
    [b"{}", b'{"type":""}', b'{"type":1}', b'{"type":null}', b'{"type":["msg"]}', b'{"Type":"x"}'],
    ids=["missing", "empty", "int", "null", "list", "case"],
)
def test_header_needs_a_type(raw: bytes) -> None:
    _fails(_framed(raw), "needs a string 'type'")


def test_lone_surrogate_escape_is_refused() -> None:
    # Decodable, but the server could never encode it again (it would crash
    # echoing an ``id`` like this one).
    _fails(_framed(b'{"type":"x","id":"\\ud800"}'), "lone surrogate")
    _fails(_framed(b'{"type":"x","\\uDFFF":1}'), "lone surrogate")
    _fails(_framed(b'{"type":"x","t":"\\ude00\\ud83d"}'), "lone surrogate")  # reversed pair
    assert parse_header(b'{"type":"x","t":"\\ud83d\\ude00"}')["t"] == "😀"
    # An escaped backslash followed by "ud800" is six ordinary characters.
    assert parse_header(b'{"type":"x","t":"\\\\ud800"}')["t"] == "\\ud800"


def test_deep_nesting_is_a_protocol_error_not_a_crash() -> None:
    raw = b'{"type":"x","a":' + b"[" * 30000 + b"]" * 30000 + b"}"
    _fails(_framed(raw), "nested too deeply")


def test_decoder_discards_its_buffer_on_failure() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame({"type": "ping"})[:10]) == []
    assert decoder.buffered == 10
    with pytest.raises(ProtocolError):
        decoder.feed(b"\x00" * 10 + _prefix(0, 0))
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(b"")


# -- encoding -----------------------------------------------------------------------------


def test_canonical_encoding() -> None:
    header = {"type": "x", "z": 1, "a": 'é\n\t\x01\x7f\u2028/"\\', "f": 0.1, "b": [True, None]}
    assert encode_header(header) == (
        '{"type":"x","z":1,"a":"é\\n\\t\\u0001\x7f\u2028/\\"\\\\","f":0.1,"b":[true,null]}'
    ).encode("utf-8")


def test_encode_frame_layout() -> None:
    data = encode_frame({"type": "x"}, b"\x00\xff")
    assert data == b'LC\x00\x0c\x00\x00\x00\x02{"type":"x"}\x00\xff'


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\udc80"])
def test_encode_header_refuses_lone_surrogates(text: str) -> None:
    with pytest.raises(ValueError, match="not valid Unicode"):
        encode_header({"type": "msg", "text": text})
    with pytest.raises(ValueError):
        encode_frame({"type": "msg", "text": text})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_encode_header_refuses_non_finite_numbers(value: float) -> None:
    with pytest.raises(ValueError):
        encode_header({"type": "x", "n": value})


def test_header_of_65535_bytes_is_the_largest() -> None:
    base = len(encode_header({"type": "x", "pad": ""}))
    largest = {"type": "x", "pad": "p" * (MAX_HEADER_SIZE - base)}
    data = encode_frame(largest)
    assert data[2:4] == b"\xff\xff"
    assert FrameDecoder(max_frame_size=None).feed(data) == [Frame(largest)]
    with pytest.raises(ValueError, match="65535"):
        encode_frame({"type": "x", "pad": "p" * (MAX_HEADER_SIZE - base + 1)})
    # Multi-byte characters count in bytes, not characters.
    with pytest.raises(ValueError, match="65535"):
        encode_frame({"type": "x", "pad": "é" * (MAX_HEADER_SIZE // 2)})


class _HugeBody(bytes):
    """Claims 4 GiB without holding it."""

    def __len__(self) -> int:
        return 1 << 32


def test_body_over_4_gib_is_refused() -> None:
    with pytest.raises(ValueError, match="body"):
        encode_frame({"type": "blob"}, _HugeBody())


# -- randomised round trip (hypothesis is not installed; fixed seeds instead) -------------

_CHARS = (
    string.printable
    + "\x00\x01\x1f\x7f\x80\xa0\xff"
    + "éßłΩжא世界\u2028\u2029\ufeff\uffff"
    + "👋😀\U0010ffff"
)


def _random_text(rng: random.Random, longest: int = 12) -> str:
    return "".join(rng.choice(_CHARS) for _ in range(rng.randint(0, longest)))


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-(2**70), 2**70)
    if kind == 2:
        return rng.uniform(-1, 1) * 10 ** rng.randint(-30, 300)
    if kind in (3, 4):
        return _random_text(rng)
    if kind in (5, 6):
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_random_text(rng): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _random_frame(rng: random.Random) -> Frame:
    header: dict[str, Any] = {"type": _random_text(rng) or "t"}
    for _ in range(rng.randint(0, 5)):
        header.setdefault(_random_text(rng), _random_value(rng))
    body = rng.randbytes(rng.choice([0, 0, 1, 7, 300]))
    return Frame(header, body)


@pytest.mark.parametrize("seed", range(25))
def test_random_frames_round_trip_however_split(seed: int) -> None:
    rng = random.Random(seed)
    frames = [_random_frame(rng) for _ in range(20)]
    encoded = [encode_frame(f.header, f.body) for f in frames]
    stream = b"".join(encoded)
    decoder = FrameDecoder()
    out: list[Frame] = []
    pos = 0
    while pos < len(stream):
        step = rng.randint(1, 64)
        out += decoder.feed(stream[pos : pos + step])
        pos += step
    assert out == frames
    assert decoder.buffered == 0
    # Canonical means stable: what was decoded encodes to the same bytes.
    assert [encode_frame(f.header, f.body) for f in out] == encoded


# -- name and text rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "Z", "alice", "Bob_2", "x-y", "a" * 32, "a" + "9" * 31, "a_-_"]
)
def test_check_nick_accepts(name: str) -> None:
    assert check_nick(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 33,
        "1abc",
        "_a",
        "-a",
        "a b",
        "a.b",
        "a/b",
        "alice\n",
        "al\x00ice",
        "élodie",
        "\u212a",  # KELVIN SIGN, which lowercases to "k"
        "a\u0661",  # an Arabic-Indic digit
        None,
        1,
        b"alice",
        ["alice"],
    ],
)
def test_check_nick_refuses(name: object) -> None:
    with pytest.raises(InvalidName) as raised:
        check_nick(name)
    assert raised.value.code == "invalid_name"
    assert protocol.NICK_RULE in raised.value.message


def test_check_nick_shortens_a_long_name_in_its_message() -> None:
    with pytest.raises(InvalidName) as raised:
        check_nick("x" * 10_000)
    assert len(raised.value.message) < 200


@pytest.mark.parametrize("name", ["lobby", "1", "9lives", "a.b", "dev-ops_2", "r" * 48, "A..."])
def test_check_room_accepts(name: str) -> None:
    assert check_room(name) == name


@pytest.mark.parametrize(
    "name", ["", "r" * 49, ".hidden", "-a", "_a", "a b", "a/b", "#chan", "lobby\n", "ü", None, 7]
)
def test_check_room_refuses(name: object) -> None:
    with pytest.raises(InvalidName) as raised:
        check_room(name)
    assert protocol.ROOM_RULE in raised.value.message


def test_fold_is_ascii_case_insensitive() -> None:
    assert fold("Alice") == fold("aLICE") == "alice"
    assert fold("Lobby.2") == "lobby.2"


@pytest.mark.parametrize("text", ["hi", " padded ", "1\n2\r\n3", "\x00", "👋", "x" * 8])
def test_check_text_accepts(text: str) -> None:
    assert check_text(text, 8) == text


def test_check_text_counts_utf8_bytes() -> None:
    assert check_text("é" * 4, 8) == "é" * 4
    with pytest.raises(BadRequest, match="9 bytes; the limit is 8"):
        check_text("é" * 4 + "x", 8)
    assert check_text("👋" * 2, 8) == "👋" * 2
    with pytest.raises(BadRequest):
        check_text("👋" * 2, 7)


@pytest.mark.parametrize("text", ["", " ", "\n\t ", "\u3000", "\u00a0"])
def test_check_text_refuses_blank(text: str) -> None:
    with pytest.raises(BadRequest, match="empty message") as raised:
        check_text(text, 100)
    assert raised.value.code == "bad_request"


@pytest.mark.parametrize("text", [None, 1, b"hi", ["hi"], {"text": "hi"}])
def test_check_text_refuses_non_strings(text: object) -> None:
    with pytest.raises(BadRequest, match="must be a string"):
        check_text(text, 100)


def test_check_text_refuses_lone_surrogates() -> None:
    with pytest.raises(BadRequest, match="not valid Unicode"):
        check_text("hi \ud800", 100)
