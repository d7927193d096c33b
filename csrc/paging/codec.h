// CPU codec for paged tensors: bit-shuffle + nvCOMP LZ4 (CPU library) per 64 KiB chunk, one batched
// nvCOMP call per group of chunks, groups in parallel on a blocking thread pool, per-chunk CRC-32C.
// A probe chunk picks the byte planes worth LZ4 (an fp32 activation's sign/exponent plane halves,
// its three mantissa planes do not shrink at all): only those are bit-shuffled and LZ4'd, the
// rest are stored raw, and chunks that do not shrink are stored raw. Blob layout: blob_hd.h.
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "paging/blob_hd.h"
#include "paging/pool.h"

namespace forge_paging {

struct CodecError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Codec {
 public:
  static constexpr uint64_t kKeepScratchBytes = 24ull << 20;  // an 8 MiB piece's slots
  // A byte plane goes through LZ4 when the probe chunk's LZ4 output of it is at most this fraction.
  static constexpr double kPlaneKeep = 0.9;
  Codec(int threads, int level, uint32_t chunk_bytes);
  // Compresses nbytes at src (elements of `width` bytes; `half`: fp32 whose low 16 bits are all
  // zero, stored as the high halves). Returns the blob size, kept in the scratch until take(),
  // or 0 when the probe chunk shrinks by less than min_ratio (the caller keeps the tensor as is).
  // lz4_planes: a mask of byte planes to LZ4, or 0 to let the probe choose.
  uint64_t compress(const uint8_t* src, uint64_t nbytes, uint32_t width, bool half, double min_ratio,
                    uint32_t lz4_planes = 0);
  // The mask of byte planes worth LZ4 for data like the middle chunk at src (0: not worth compressing).
  uint32_t probe(const uint8_t* src, uint64_t nbytes, uint32_t width, bool half, double min_ratio);
  void take(uint8_t* dst);
  // Restores nbytes into dst; throws CodecError naming the chunk on any mismatch.
  void decompress(const uint8_t* blob, uint64_t blob_bytes, uint8_t* dst, uint64_t nbytes, uint32_t width,
                  bool half) const;
  uint64_t slot_bytes() const { return slot_bytes_; }
  // The raw scratch slots of the last compress() (kept for tensors under kKeepScratchBytes; for tests).
  const std::vector<uint8_t>& slots() const { return slots_; }
  const std::vector<ChunkEntry>& entries() const { return entries_; }
  uint32_t lz4_planes() const { return header_.lz4_planes; }

 private:
  int level_;
  uint32_t chunk_bytes_;
  Pool pool_;
  uint64_t slot_bytes_;
  std::vector<uint8_t> slots_;
  std::vector<ChunkEntry> entries_;
  std::vector<uint64_t> offsets_;
  BlobHeader header_{};
  uint64_t blob_bytes_ = 0;

  std::pair<uint64_t, uint32_t> logical_stream(uint64_t nbytes, uint32_t width, bool half) const;
  uint32_t probe_planes(const uint8_t* src, uint32_t chunk, uint64_t logical, uint32_t width, bool half,
                        double min_ratio);
};

// True when every fp32 at p has its low 16 bits zero (a bf16 value held in fp32).
bool fp32_low16_zero(const uint8_t* p, uint64_t n);

}  // namespace forge_paging
