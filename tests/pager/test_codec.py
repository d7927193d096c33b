"""The paging codec: bit-shuffle against a numpy oracle, round trips of every dtype and data shape,
nvCOMP's LZ4 blocks decoded by the independent python `lz4` decoder, and corruption detection."""
import struct

import lz4.block
import numpy as np
import pytest
import torch

from forge_rt.core.native import require_native
from forge_rt.pager import PagingError, TensorCodec

P = require_native().paging
T = require_native().testing
CHUNK = 65536
HLIF_HEADER = 88  # nvCOMP's HLIF header for a one-chunk buffer; bytes 80..88 hold the LZ4 block length

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64]


def np_bitshuffle(buf: bytes, width: int) -> bytes:
    """Oracle: bit-plane k (byte b, bit j) holds bit j of byte b of every element, 8 elements per byte."""
    a = np.frombuffer(buf, np.uint8)
    n = len(a) // width
    n8 = n - n % 8
    planes = a[: n8 * width].reshape(n8, width).T  # [width, n8] byte planes
    bits = np.unpackbits(planes[:, :, None], axis=2, bitorder="little")  # [width, n8, 8]
    out = np.packbits(bits.transpose(0, 2, 1), axis=2, bitorder="little")  # [width, 8, n8/8]
    return out.tobytes() + a[n8 * width:].tobytes()


def make(kind: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(numel)
    if dtype == torch.bool:
        return torch.rand(numel, generator=g) < (0.5 if kind == "random" else 0.02)
    if dtype.is_complex:
        return torch.randn(numel, generator=g, dtype=dtype)
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        if kind == "constant":
            return torch.full((numel,), 7, dtype=dtype)
        lo, hi = max(info.min, -2**31), min(info.max, 2**31 - 1)
        t = torch.randint(lo, hi, (numel,), generator=g, dtype=torch.int64).to(dtype)
        return t * (torch.rand(numel, generator=g) < 0.05) if kind == "sparse" else t
    t = torch.randn(numel, generator=g, dtype=torch.float32).to(dtype)
    if kind == "constant":
        t = torch.full((numel,), 3.25, dtype=dtype)
    elif kind == "sparse":
        t = t * (torch.rand(numel, generator=g) < 0.05)
    elif kind == "nan_inf":
        t[::7] = float("nan")
        t[1::11] = float("inf")
        t[2::13] = float("-inf")
        t[3::17] = -0.0
    return t


def bits(t: torch.Tensor) -> torch.Tensor:
    """A view that compares bit patterns (NaN payloads, -0.0) rather than values."""
    return t.view(torch.uint8) if t.dtype != torch.bool else t


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 31, 32, 33, 100, 1000, 4099])
def test_bitshuffle_matches_numpy_oracle(width, n):
    src = torch.randint(0, 256, (n * width,), dtype=torch.uint8)
    src[: n * width // 3] = 0  # runs as well as noise
    for simd in (True, False):
        dst = torch.empty_like(src)
        T.bitshuffle(src.data_ptr(), dst.data_ptr(), n, width, simd)
        assert dst.numpy().tobytes() == np_bitshuffle(src.numpy().tobytes(), width)
        back = torch.empty_like(src)
        T.bitunshuffle(dst.data_ptr(), back.data_ptr(), n, width, simd)
        assert torch.equal(back, src)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "constant", "sparse", "nan_inf"])
@pytest.mark.parametrize("numel", [0, 1, 333, 65536 + 17, 300_001])
def test_round_trip_every_dtype(dtype, kind, numel):
    if kind == "nan_inf" and not dtype.is_floating_point:
        pytest.skip("NaN/Inf only exist in floating dtypes")
    codec = TensorCodec(min_ratio=0.0)  # always compress, so every path is exercised
    t = make(kind, dtype, numel)
    enc = codec.encode(t)
    out = torch.empty_like(t)
    codec.decode(enc.pieces, out, enc.half, "t")
    assert torch.equal(bits(out), bits(t))


def test_bf16_values_in_fp32_are_halved():
    t = torch.randn(200_000).bfloat16().float()
    enc = TensorCodec().encode(t)
    assert enc.half and enc.nbytes < t.numel() * 2  # below bf16 size, not just fp32/2
    out = torch.empty_like(t)
    TensorCodec().decode(enc.pieces, out, enc.half, "t")
    assert torch.equal(out.view(torch.int32), t.view(torch.int32))
    t[12345] = 1.0000001  # one element with low bits set: no halving
    assert not TensorCodec(min_ratio=0.0).encode(t).half
    assert P.fp32_low16_zero(t.data_ptr(), 12345) and not P.fp32_low16_zero(t.data_ptr(), t.numel())


def test_probe_skips_incompressible():
    assert TensorCodec().encode(torch.randint(0, 256, (300_000,), dtype=torch.uint8)) is None
    assert TensorCodec().encode(torch.zeros(300_000)) is not None


def test_plane_choice_is_cached_per_kind_and_reprobed():
    """A kind's probe result (here: skip, from noise) holds for `reprobe` uses, then is probed again."""
    codec = TensorCodec(reprobe=2)
    noise = torch.randint(0, 256, (300_000,), dtype=torch.uint8)
    zeros = torch.zeros(300_000, dtype=torch.uint8)
    assert codec.encode(noise, kind="k") is None
    assert codec.encode(zeros, kind="k") is None and codec.encode(zeros, kind="k") is None  # cached: no probe
    assert codec.encode(zeros, kind="k") is not None  # uses spent: probed again
    assert codec.encode(zeros, kind="other") is not None and codec.encode(zeros) is not None


def parse_blob(blob: bytes):
    magic, n, chunk_bytes, width, logical, flags, lz4_planes = struct.unpack_from("<IIIIQII", blob, 0)
    assert magic == 0x31505246
    table = [struct.unpack_from("<II", blob, P.HEADER_BYTES + 8 * i) for i in range(n)]
    at = P.HEADER_BYTES + 8 * n
    payloads = []
    for stored, crc in table:
        length = stored & ~P.RAW_FLAG
        payloads.append((bool(stored & P.RAW_FLAG), blob[at:at + length], crc))
        at += length
    assert at == len(blob)
    return chunk_bytes, width, logical, flags, lz4_planes, payloads


def expected_sections(chunk: bytes, width: int, lz4_planes: int):
    """Oracle for one chunk's layout: raw byte planes, the bit-shuffled LZ4 input, and the tail."""
    a = np.frombuffer(chunk, np.uint8)
    n8 = len(a) // width // 8 * 8
    planes = a[: n8 * width].reshape(n8, width).T
    raw = b"".join(planes[b].tobytes() for b in range(width) if not lz4_planes >> b & 1)
    shuffled = b"".join(np_bitshuffle(planes[b].tobytes(), 1) for b in range(width) if lz4_planes >> b & 1)
    return raw, shuffled, a[n8 * width:].tobytes()


@pytest.mark.parametrize("dtype,kind,numel", [(torch.bfloat16, "random", 300_001), (torch.float32, "sparse", 70_000),
                                              (torch.float32, "random", 100_003), (torch.int32, "constant", 40_000),
                                              (torch.uint8, "sparse", 100_000), (torch.int64, "sparse", 9_999)])
def test_blob_decodes_with_reference_lz4(dtype, kind, numel):
    """Walk the blob in Python and decode every LZ4 section with python-lz4 (not nvCOMP)."""
    t = make(kind, dtype, numel)
    enc = TensorCodec(min_ratio=0.0).encode(t)
    chunk_bytes, width, logical, flags, lz4_planes, payloads = parse_blob(enc.pieces[0].numpy().tobytes())
    src = t.view(torch.uint8).numpy().tobytes() if dtype != torch.bool else t.numpy().tobytes()
    assert logical == len(src) and width == t.element_size() and flags == 0 and 0 < lz4_planes < 1 << width
    n_lz4 = 0
    for i, (raw, payload, crc) in enumerate(payloads):
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
        assert T.crc32c_hd(buf.data_ptr(), len(payload)) == crc
        want_raw, want_shuffled, want_tail = expected_sections(src[i * chunk_bytes:(i + 1) * chunk_bytes], width,
                                                               lz4_planes)
        assert payload[:len(want_raw)] == want_raw, f"chunk {i} raw planes"
        assert payload[len(payload) - len(want_tail):] == want_tail, f"chunk {i} tail"
        section = payload[len(want_raw):len(payload) - len(want_tail)]
        if not raw:
            (block_len,) = struct.unpack_from("<Q", section, 80)
            assert HLIF_HEADER + block_len <= len(section) < HLIF_HEADER + block_len + 8  # 8-byte padded
            section = lz4.block.decompress(section[HLIF_HEADER:HLIF_HEADER + block_len],
                                           uncompressed_size=len(want_shuffled))
            n_lz4 += 1
        assert section == want_shuffled, f"chunk {i}"
    assert n_lz4 > 0


@pytest.mark.parametrize("dtype,planes", [(torch.float32, 0b1000), (torch.bfloat16, 0b10), (torch.float16, 0b10)])
def test_probe_sends_only_the_exponent_plane_of_activations_to_lz4(dtype, planes):
    """Normal-like floats: only the sign/exponent byte plane shrinks under LZ4, so only it costs LZ4 time."""
    t = (torch.randn(400_000, generator=torch.Generator().manual_seed(5)) * 0.3).to(dtype)
    codec = P.Codec(2, 1, CHUNK)
    assert codec.compress(t.data_ptr(), t.numel() * t.element_size(), t.element_size(), False, 1.05) > 0
    assert codec.lz4_planes == planes
    forced = codec.compress(t.data_ptr(), t.numel() * t.element_size(), t.element_size(), False, 1.05,
                            (1 << t.element_size()) - 1)
    assert forced > 0 and codec.lz4_planes == (1 << t.element_size()) - 1
    enc = TensorCodec().encode(t)
    out = torch.empty_like(t)
    TensorCodec().decode(enc.pieces, out, enc.half, "t")
    assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))


def test_raw_chunks_when_lz4_does_not_shrink():
    t = torch.randint(0, 256, (3 * CHUNK,), dtype=torch.uint8)
    t[:CHUNK] = 0
    enc = TensorCodec(min_ratio=0.0).encode(t)
    _, _, _, _, _, payloads = parse_blob(enc.pieces[0].numpy().tobytes())
    assert [raw for raw, _, _ in payloads] == [False, True, True]


def test_many_groups_mix_raw_and_lz4_chunks():
    """74 chunks span several batched nvCOMP calls; every third chunk is noise and must come back raw."""
    t = make("sparse", torch.float32, 74 * CHUNK // 4 + 5)
    g = torch.Generator().manual_seed(3)
    for k in range(0, 74, 3):
        t[k * CHUNK // 4:(k + 1) * CHUNK // 4] = torch.randint(-2**31, 2**31 - 1, (CHUNK // 4,), generator=g,
                                                               dtype=torch.int32).view(torch.float32)
    codec = TensorCodec(min_ratio=0.0)
    enc = codec.encode(t)
    _, _, _, _, _, payloads = parse_blob(enc.pieces[0].numpy().tobytes())
    assert [raw for raw, _, _ in payloads] == [k % 3 == 0 or k == 74 for k in range(75)]  # 74: 20 bytes, too short
    out = torch.empty_like(t)
    codec.decode(enc.pieces, out, enc.half, "t")
    assert torch.equal(bits(out), bits(t))


def test_compaction_logic_of_the_cuda_path_on_cpu():
    """The __host__ __device__ offset/descriptor/copy code gives the same blob as the CPU codec."""
    t = make("sparse", torch.float32, 5 * CHUNK // 4 + 123)
    t[: CHUNK // 4] = torch.randint(-2**31, 2**31 - 1, (CHUNK // 4,), dtype=torch.int32).view(torch.float32)
    codec = P.Codec(2, 1, CHUNK)
    n = codec.compress(t.data_ptr(), t.numel() * 4, 4, False, 0.0)
    blob = torch.empty(n, dtype=torch.uint8)
    codec.take(blob.data_ptr())
    stored = T.codec_last_stored(codec)
    assert stored[0] & P.RAW_FLAG  # random chunk stays raw
    slots = torch.frombuffer(bytearray(T.codec_last_slots(codec)), dtype=torch.uint8)
    table = P.HEADER_BYTES + 8 * len(stored)
    lengths = np.array([s & ~P.RAW_FLAG for s in stored], dtype=np.int64)
    for lanes in (1, 3, 128):
        out = torch.zeros(n, dtype=torch.uint8)
        offsets, total = T.compact_reference(slots.data_ptr(), stored, codec.slot_bytes, out.data_ptr(), lanes)
        assert total == n
        assert offsets == list(table + np.concatenate([[0], np.cumsum(lengths)[:-1]]))
        assert torch.equal(out[table:], blob[table:])
    assert T.stored_field(100, 100) == 100 | P.RAW_FLAG and T.stored_field(99, 100) == 99


def test_corrupt_chunk_and_truncated_blob_are_detected():
    codec = TensorCodec()
    t = make("sparse", torch.float32, 4 * CHUNK)
    enc = codec.encode(t)
    out = torch.empty_like(t)
    _, _, _, _, _, payloads = parse_blob(enc.pieces[0].numpy().tobytes())
    at = P.HEADER_BYTES + 8 * len(payloads) + len(payloads[0][1]) + len(payloads[1][1]) + len(payloads[2][1]) // 2
    bad = enc.pieces[0].clone()
    bad[at] ^= 0x40
    with pytest.raises(PagingError, match=r"tensor layer3\.act .*chunk 2 .*CRC-32C"):
        codec.decode([bad], out, enc.half, "layer3.act")
    with pytest.raises(PagingError, match="truncated"):
        codec.decode([enc.pieces[0][:-5]], out, enc.half, "layer3.act")
    with pytest.raises(PagingError, match="not a forge_rt blob"):
        codec.decode([torch.zeros(64, dtype=torch.uint8)], out, enc.half, "layer3.act")
    with pytest.raises(PagingError, match="2 stored pieces where its size needs 1"):
        codec.decode(enc.pieces * 2, out, enc.half, "layer3.act")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_big_tensors_are_encoded_in_pieces(dtype):
    """A tensor over piece_bytes becomes several independent blobs (3.5 pieces here), each checked on restore."""
    codec = TensorCodec(min_ratio=0.0, piece_bytes=CHUNK * 4)
    t = make("sparse", dtype, 7 * CHUNK * 2 // dtype.itemsize + 3)
    enc = codec.encode(t)
    assert len(enc.pieces) == 4
    out = torch.empty_like(t)
    codec.decode(enc.pieces, out, enc.half, "big")
    assert torch.equal(bits(out), bits(t))
    bad = [p.clone() for p in enc.pieces]
    bad[2][-1] ^= 1
    with pytest.raises(PagingError, match=r"tensor big failed its integrity check on restore \(piece 2 of 4\)"):
        codec.decode(bad, out, enc.half, "big")


def test_crc32c_hardware_and_gpu_bitwise_agree_with_the_standard():
    """Two independent CRC-32C implementations (CPU instructions, the GPU kernels' bitwise loop) and
    the standard's check value for "123456789"."""
    check = torch.frombuffer(bytearray(b"123456789"), dtype=torch.uint8)
    assert P.crc32c(check.data_ptr(), 9) == T.crc32c_hd(check.data_ptr(), 9) == T.crc32c_table(check.data_ptr(), 9)
    assert P.crc32c(check.data_ptr(), 9) == 0xE3069283
    for n in (0, 1, 7, 8, 9, 4096, 65536 + 3):
        b = torch.randint(0, 256, (n,), dtype=torch.uint8)
        assert P.crc32c(b.data_ptr(), n) == T.crc32c_hd(b.data_ptr(), n) == T.crc32c_table(b.data_ptr(), n)
