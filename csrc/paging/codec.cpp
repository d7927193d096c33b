#include "paging/codec.h"

#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>

#include "nvcomp_cpu.hpp"
#include "paging/bitshuffle.h"
#ifdef FORGE_RT_AVX2
#include <immintrin.h>
#endif

namespace forge_paging {
namespace {

// One nvCOMP manager and three chunk buffers per OpenMP thread (managers are not shared).
struct ThreadState {
  int level = -1;
  uint32_t chunk_bytes = 0;
  std::unique_ptr<nvcomp::LZ4CPUManager> mgr;
  std::vector<uint8_t> logical, shuffled, tmp;

  nvcomp::LZ4CPUManager& get(uint32_t cb, int lvl) {
    if (!mgr || cb != chunk_bytes || lvl != level) {
      mgr = std::make_unique<nvcomp::LZ4CPUManager>(cb, lvl, 1);
      chunk_bytes = cb;
      level = lvl;
      logical.resize(cb);
      shuffled.resize(cb);
      tmp.resize(cb);
    }
    return *mgr;
  }
};

ThreadState& state() {
  thread_local ThreadState s;
  return s;
}

uint32_t crc(const uint8_t* p, uint32_t n) { return uint32_t(crc32(0L, p, n)); }

// Logical chunk at logical offset off: the tensor bytes, or the high 16 bits of each fp32 when half.
const uint8_t* gather(const uint8_t* src, uint64_t off, uint32_t len, bool half, uint8_t* buf) {
  if (!half) return src + off;
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src) + 2 * (off / 2) + 1;  // element off/2, high half
  uint16_t* d = reinterpret_cast<uint16_t*>(buf);
  for (uint32_t k = 0; k < len / 2; ++k) d[k] = s[2 * k];
  return buf;
}

void scatter(const uint8_t* logical, uint8_t* dst, uint64_t off, uint32_t len, bool half) {
  if (!half) { std::memcpy(dst + off, logical, len); return; }
  const uint16_t* s = reinterpret_cast<const uint16_t*>(logical);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst) + off / 2;
  for (uint32_t k = 0; k < len / 2; ++k) d[k] = uint32_t(s[k]) << 16;
}

}  // namespace

Codec::Codec(int threads, int level, uint32_t chunk_bytes)
    : level_(level), chunk_bytes_(chunk_bytes), pool_(std::make_unique<Pool>(std::max(1, threads))) {
  if (chunk_bytes == 0 || chunk_bytes % 64 != 0) throw CodecError("chunk_bytes must be a positive multiple of 64");
  slot_bytes_ = state().get(chunk_bytes_, level_).configure_compression(chunk_bytes_).max_compressed_buffer_size;
}

uint64_t Codec::compress(const uint8_t* src, uint64_t nbytes, uint32_t width, bool half, double min_ratio) {
  const uint64_t logical = half ? nbytes / 2 : nbytes;
  const uint32_t w = half ? 2 : width;
  const uint32_t n = n_chunks_for(logical, chunk_bytes_);
  header_ = BlobHeader{kBlobMagic, n, chunk_bytes_, w, logical, half ? kFlagHalf : 0u, 0u};
  slots_.resize(uint64_t(n) * slot_bytes_);
  entries_.assign(n, ChunkEntry{0, 0});
  offsets_.assign(n, 0);
  std::atomic<int> failed{-1};
  std::string why;

  auto one = [&](uint32_t i) {
    ThreadState& ts = state();
    nvcomp::LZ4CPUManager& mgr = ts.get(chunk_bytes_, level_);
    const uint32_t len = chunk_len(i, logical, chunk_bytes_);
    const uint64_t off = uint64_t(i) * chunk_bytes_;
    const uint8_t* in = gather(src, off, len, half, ts.logical.data());
    bitshuffle(in, ts.shuffled.data(), ts.tmp.data(), len / w, w);
    uint8_t* slot = slots_.data() + uint64_t(i) * slot_bytes_;
    auto cfg = mgr.configure_compression(len);
    mgr.compress(ts.shuffled.data(), slot, cfg);
    const uint64_t comp = mgr.get_compressed_output_size(slot);
    entries_[i].stored = stored_field(comp, len);
    if (entries_[i].stored & kRawFlag) std::memcpy(slot, ts.shuffled.data(), len);
    entries_[i].crc = crc(slot, payload_len(entries_[i].stored));
  };
  auto guarded = [&](uint32_t i) {
    try {
      one(i);
    } catch (const std::exception& e) {
      int expect = -1;
      if (failed.compare_exchange_strong(expect, int(i))) why = e.what();
    }
  };

  if (n == 0) {
    blob_bytes_ = table_bytes(0);
    return blob_bytes_;
  }
  // Probe the middle chunk: tensors that do not compress cost one chunk of codec time, not all.
  const uint32_t probe = n / 2;
  guarded(probe);
  if (failed.load() >= 0) throw CodecError("nvCOMP LZ4 compress failed on chunk " + std::to_string(probe) + ": " + why);
  const double ratio = double(chunk_len(probe, logical, chunk_bytes_)) / payload_len(entries_[probe].stored);
  if (ratio < min_ratio) return 0;

  pool_->run(n, [&](int64_t i) {
    if (uint32_t(i) != probe) guarded(uint32_t(i));
  });
  if (failed.load() >= 0)
    throw CodecError("nvCOMP LZ4 compress failed on chunk " + std::to_string(failed.load()) + ": " + why);
  blob_bytes_ = plan_offsets(entries_.data(), n, offsets_.data());
  return blob_bytes_;
}

void Codec::take(uint8_t* dst) {
  std::memcpy(dst, &header_, sizeof(header_));
  std::memcpy(dst + sizeof(header_), entries_.data(), entries_.size() * sizeof(ChunkEntry));
  pool_->run(int64_t(entries_.size()), [&](int64_t i) {
    const ChunkDesc d = describe_chunk(uint32_t(i), entries_.data(), offsets_.data(), slot_bytes_);
    std::memcpy(dst + d.dst, slots_.data() + d.src, d.len);
  });
  // Keep a small scratch for the many small tensors; a big one (logits) would otherwise stay
  // resident for the whole run beside the pool it was meant to shrink.
  if (slots_.size() > kKeepScratchBytes) std::vector<uint8_t>().swap(slots_);
}

void Codec::decompress(const uint8_t* blob, uint64_t blob_bytes, uint8_t* dst, uint64_t nbytes, uint32_t width,
                       bool half) const {
  if (blob_bytes < sizeof(BlobHeader)) throw CodecError("blob is truncated (no header)");
  BlobHeader h;
  std::memcpy(&h, blob, sizeof(h));
  const uint64_t logical = half ? nbytes / 2 : nbytes;
  const uint32_t w = half ? 2 : width;
  static const char* reasons[] = {"", "bad magic (not a forge_rt blob)", "header does not match the tensor",
                                  "blob size does not match its chunk table (truncated?)",
                                  "raw chunk has the wrong length"};
  if (blob_bytes < table_bytes(0) || (h.magic == kBlobMagic && blob_bytes < table_bytes(h.n_chunks)))
    throw CodecError(std::string("corrupt blob: ") + reasons[3]);
  std::vector<ChunkEntry> entries(h.magic == kBlobMagic ? h.n_chunks : 0);
  if (!entries.empty()) std::memcpy(entries.data(), blob + sizeof(BlobHeader), entries.size() * sizeof(ChunkEntry));
  const int bad = check_table(h, entries.data(), blob_bytes, logical);
  if (bad) throw CodecError(std::string("corrupt blob: ") + reasons[bad]);
  if (h.width != w || ((h.flags & kFlagHalf) != 0) != half) throw CodecError(std::string("corrupt blob: ") + reasons[2]);
  std::vector<uint64_t> offsets(h.n_chunks);
  plan_offsets(entries.data(), h.n_chunks, offsets.data());

  std::atomic<int> failed{-1};
  std::string why;
  pool_->run(int64_t(h.n_chunks), [&](int64_t i) {
    try {
      ThreadState& ts = state();
      const uint32_t len = chunk_len(uint32_t(i), logical, h.chunk_bytes);
      const ChunkDesc d = describe_chunk(uint32_t(i), entries.data(), offsets.data(), 0);
      const uint8_t* payload = blob + d.dst;
      if (crc(payload, d.len) != entries[i].crc) throw CodecError("crc32 mismatch");
      nvcomp::LZ4CPUManager& mgr = ts.get(h.chunk_bytes, level_);
      const uint8_t* shuffled = payload;
      if (!d.raw) {
        auto cfg = mgr.configure_decompression(payload);
        if (cfg.decomp_data_size != len) throw CodecError("LZ4 chunk has the wrong decompressed size");
        mgr.decompress(ts.shuffled.data(), payload, cfg);
        if (*cfg.get_status() != nvcompSuccess) throw CodecError("nvCOMP LZ4 decompress failed");
        shuffled = ts.shuffled.data();
      }
      uint8_t* logical_out = half ? ts.logical.data() : dst + uint64_t(i) * h.chunk_bytes;
      bitunshuffle(shuffled, logical_out, ts.tmp.data(), len / w, w);
      if (half) scatter(logical_out, dst, uint64_t(i) * h.chunk_bytes, len, true);
    } catch (const std::exception& e) {
      int expect = -1;
      if (failed.compare_exchange_strong(expect, int(i))) why = e.what();
    }
  });
  if (failed.load() >= 0)
    throw CodecError("chunk " + std::to_string(failed.load()) + " of " + std::to_string(h.n_chunks) + ": " + why);
}

bool fp32_low16_zero(const uint8_t* p, uint64_t n) {
  const uint32_t* x = reinterpret_cast<const uint32_t*>(p);
  uint64_t i = 0;
#ifdef FORGE_RT_AVX2
  const __m256i mask = _mm256_set1_epi32(0xFFFF);
  for (; i + 32 <= n; i += 32) {  // 128 bytes per test: early exit stays cheap on real fp32 data
    __m256i acc = _mm256_setzero_si256();
    for (int k = 0; k < 4; ++k)
      acc = _mm256_or_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 8 * k)));
    if (!_mm256_testz_si256(acc, mask)) return false;
  }
#endif
  for (; i < n; ++i)
    if (x[i] & 0xFFFFu) return false;
  return true;
}

}  // namespace forge_paging
