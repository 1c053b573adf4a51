"""The wire protocol as pure functions: round trips and bounds, no sockets."""

import struct

import numpy as np
import pytest

from aniserve import protocol


def test_posdata_round_trip_single_and_batched():
    rng = np.random.default_rng(0)
    cells, positions = rng.normal(size=(3, 3, 3)), rng.normal(size=(3, 5, 3))
    msg, used = protocol.decode(protocol.encode_posdata(cells[:1], positions[:1]), protocol.Mode())
    np.testing.assert_array_equal(msg.cells, cells[:1])
    np.testing.assert_array_equal(msg.positions, positions[:1])
    data = protocol.encode_posdata(cells, positions, batch_size=3)
    msg, used = protocol.decode(data, protocol.Mode(batch_size=3))
    assert used == len(data)
    np.testing.assert_array_equal(msg.cells, cells)
    np.testing.assert_array_equal(msg.positions, positions)


def test_every_truncation_is_incomplete_not_an_error():
    data = protocol.encode_posdata(np.eye(3)[None], np.ones((1, 4, 3)))
    for cut in range(len(data)):
        assert protocol.decode(data[:cut], protocol.Mode()) is None


def test_forceready_round_trip_and_init_batch_size():
    for b in (1, 3):
        e, f, v = np.arange(b) * 1.0, np.ones((b, 4, 3)), np.ones((b, 3, 3))
        extras = [f'{{"i": {i}}}' for i in range(b)]
        data = protocol.encode_forceready(e, f, v, extras, protocol.Mode(batch_size=b))
        (e2, f2, v2, x2), used = protocol.decode_forceready(data, b)
        assert used == len(data) and x2 == extras
        np.testing.assert_array_equal(e2, e)
        np.testing.assert_array_equal(f2, f)
        np.testing.assert_array_equal(v2, v)
    msg, _ = protocol.decode(protocol.encode_init(2, "foo, batch_size:8"), protocol.Mode())
    assert msg.batch_size == 8 and msg.bead == 2


def test_forceready_bytes_follow_ipi_layout():
    # Written out field by field from i-PI's sockets.py: B energies, natoms, B × 3N
    # forces, B × 9 virial, then per structure the extras length and text.
    rng = np.random.default_rng(1)
    for b in (1, 2):
        e, f, v = rng.normal(size=b), rng.normal(size=(b, 2, 3)), rng.normal(size=(b, 3, 3))
        extras = ["", "{}"][:b] if b == 2 else ["xyz"]
        expected = (
            b"FORCEREADY  "
            + struct.pack(f"<{b}d", *e)
            + struct.pack("<i", 2)
            + struct.pack(f"<{6 * b}d", *f.ravel())
            + struct.pack(f"<{9 * b}d", *v.ravel())
            + b"".join(struct.pack("<i", len(x)) + x.encode() for x in extras)
        )
        assert protocol.encode_forceready(e, f, v, extras, protocol.Mode(batch_size=b)) == expected


def test_forceready_length_without_decoding():
    for b in (1, 3):
        data = protocol.encode_forceready(
            np.zeros(b), np.ones((b, 4, 3)), np.ones((b, 3, 3)), ["{}"] * b, protocol.Mode(batch_size=b)
        )
        assert protocol.forceready_length(data + protocol.header("STATUS"), b) == len(data)
        assert all(protocol.forceready_length(data[:cut], b) is None for cut in range(len(data)))
    with pytest.raises(protocol.ProtocolError, match="expected FORCEREADY"):
        protocol.forceready_length(protocol.header("STATUS"))
    negative = protocol.header("FORCEREADY") + struct.pack("<di", 0.0, 1) + bytes(96) + struct.pack("<i", -5)
    with pytest.raises(protocol.ProtocolError, match="extras length -5"):
        protocol.forceready_length(negative)


@pytest.mark.parametrize(
    "payload,match",
    [
        (protocol.header("INIT") + struct.pack("<ii", 0, -1), "INIT string length -1"),
        (protocol.encode_init(0, "batch_size:0"), "batch_size 0"),
        (protocol.header("FORCEREADY"), "never receives FORCEREADY"),
        (b"HELLO WORLD!", "unknown message header"),
    ],
)
def test_bad_input_is_a_protocol_error(payload, match):
    with pytest.raises(protocol.ProtocolError, match=match):
        protocol.decode(payload, protocol.Mode())
