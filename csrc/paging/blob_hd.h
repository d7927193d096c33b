// Layout of one paged tensor's blob, shared by the CPU codec and the CUDA compaction kernel:
//   [BlobHeader][ChunkEntry x n_chunks][payload of chunk 0][payload of chunk 1]...
// Each chunk is compressed into its own fixed-size scratch slot; compaction then moves the
// payloads next to each other at offsets given by an exclusive scan of the stored sizes.
// CPU blobs (no kFlagGpu) store each chunk as [raw planes][LZ4 section][tail]: the raw planes are
// the byte planes outside BlobHeader.lz4_planes (n8 = n - n % 8 bytes each, plane order; n8 keeps
// the LZ4 section 8-byte aligned as nvCOMP requires), the LZ4 section is LZ4 of the bit-transposed
// planes in lz4_planes, and the tail is the last n % 8 elements as they are. A chunk whose payload
// would not be smaller is stored raw: the LZ4 section holds its input bytes as is.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common.h"

namespace forge_paging {

constexpr uint32_t kBlobMagic = 0x31505246u;  // "FRP1"
constexpr uint32_t kRawFlag = 0x80000000u;    // ChunkEntry.stored: payload is not LZ4
constexpr uint32_t kFlagHalf = 1u;            // BlobHeader.flags: fp32 stored as its high 16 bits
constexpr uint32_t kFlagGpu = 2u;             // payloads are nvCOMP batched raw LZ4 blocks (bit-shuffled
                                              // inside nvCOMP), not HLIF buffers; raw chunks unshuffled

struct BlobHeader {
  uint32_t magic;
  uint32_t n_chunks;
  uint32_t chunk_bytes;   // logical bytes per chunk (last chunk may be shorter)
  uint32_t width;         // element width the bit-shuffle used (logical stream)
  uint64_t logical_bytes; // bytes of the logical stream (half of the tensor when kFlagHalf)
  uint32_t flags;
  uint32_t lz4_planes;    // CPU blobs: bit b set = byte plane b is bit-shuffled and LZ4'd (see above)
};
static_assert(sizeof(BlobHeader) == 32, "BlobHeader is 32 bytes");

struct ChunkEntry {
  uint32_t stored;  // payload bytes, | kRawFlag when raw
  uint32_t crc;     // CRC-32C of the payload bytes
};

struct ChunkDesc {
  uint64_t src;     // offset of the payload in the scratch slots
  uint64_t dst;     // offset of the payload in the blob
  uint32_t len;     // payload bytes
  bool raw;
};

FORGE_HD inline uint32_t n_chunks_for(uint64_t logical_bytes, uint32_t chunk_bytes) {
  return uint32_t((logical_bytes + chunk_bytes - 1) / chunk_bytes);
}

FORGE_HD inline uint32_t chunk_len(uint32_t i, uint64_t logical_bytes, uint32_t chunk_bytes) {
  const uint64_t start = uint64_t(i) * chunk_bytes;
  const uint64_t rest = logical_bytes - start;
  return uint32_t(rest < chunk_bytes ? rest : chunk_bytes);
}

FORGE_HD inline uint32_t popcount32(uint32_t m) {
  uint32_t c = 0;
  for (; m; m &= m - 1) ++c;
  return c;
}

// Bytes of a chunk's raw planes and of its tail (len logical bytes of `width`-byte elements).
FORGE_HD inline uint32_t raw_plane_bytes(uint32_t len, uint32_t width, uint32_t lz4_planes) {
  const uint32_t n = len / width;
  return (width - popcount32(lz4_planes)) * (n - n % 8);
}

FORGE_HD inline uint32_t tail_bytes(uint32_t len, uint32_t width) { return (len / width) % 8 * width; }

FORGE_HD inline uint64_t table_bytes(uint32_t n_chunks) {
  return sizeof(BlobHeader) + uint64_t(n_chunks) * sizeof(ChunkEntry);
}

// The entry's stored field for a chunk of raw_len bytes whose LZ4 output is comp_len bytes.
FORGE_HD inline uint32_t stored_field(uint64_t comp_len, uint32_t raw_len) {
  return comp_len < raw_len ? uint32_t(comp_len) : (raw_len | kRawFlag);
}

FORGE_HD inline uint32_t payload_len(uint32_t stored) { return stored & ~kRawFlag; }

// Exclusive scan of payload lengths; returns the blob's total size. Sequential on purpose: one
// thread per tensor, n_chunks is a few thousand at most.
FORGE_HD inline uint64_t plan_offsets(const ChunkEntry* entries, uint32_t n_chunks, uint64_t* offsets) {
  uint64_t at = table_bytes(n_chunks);
  for (uint32_t i = 0; i < n_chunks; ++i) {
    offsets[i] = at;
    at += payload_len(entries[i].stored);
  }
  return at;
}

FORGE_HD inline ChunkDesc describe_chunk(uint32_t i, const ChunkEntry* entries, const uint64_t* offsets,
                                         uint64_t slot_bytes) {
  ChunkDesc d;
  d.src = uint64_t(i) * slot_bytes;
  d.dst = offsets[i];
  d.len = payload_len(entries[i].stored);
  d.raw = (entries[i].stored & kRawFlag) != 0;
  return d;
}

// Bytes [lane, lane + lanes, ...) of one payload; the GPU runs one block per chunk, the CPU lanes=1.
FORGE_HD inline void copy_lane(uint8_t* blob, const uint8_t* slots, const ChunkDesc& d, uint32_t lane,
                               uint32_t lanes) {
  for (uint64_t k = lane; k < d.len; k += lanes) blob[d.dst + k] = slots[d.src + k];
}

// CRC-32C (Castagnoli), bitwise: the GPU kernels' checksum and the reference for the CPU codec's
// hardware version (crc32c.h); the tests check both against each other and the standard check value.
FORGE_HD inline uint32_t crc32c_update(uint32_t crc, const uint8_t* p, uint64_t n) {
  crc = ~crc;
  for (uint64_t k = 0; k < n; ++k) {
    crc ^= p[k];
    for (int b = 0; b < 8; ++b) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
  }
  return ~crc;
}

// Validates a blob's header and table against its size; returns 0 or a reason code (see codec.cpp).
FORGE_HD inline int check_table(const BlobHeader& h, const ChunkEntry* entries, uint64_t blob_bytes,
                                uint64_t expect_logical) {
  if (h.magic != kBlobMagic) return 1;
  if (h.logical_bytes != expect_logical) return 2;
  if (h.chunk_bytes == 0 || h.n_chunks != n_chunks_for(h.logical_bytes, h.chunk_bytes)) return 2;
  if (blob_bytes < table_bytes(h.n_chunks)) return 3;
  uint64_t total = table_bytes(h.n_chunks);
  for (uint32_t i = 0; i < h.n_chunks; ++i) {
    const uint32_t len = payload_len(entries[i].stored);
    if ((entries[i].stored & kRawFlag) && len != chunk_len(i, h.logical_bytes, h.chunk_bytes)) return 4;
    total += len;
  }
  return total == blob_bytes ? 0 : 3;
}

}  // namespace forge_paging
