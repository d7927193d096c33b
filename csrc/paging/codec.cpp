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

constexpr uint32_t kGroupChunks = 32;

// One nvCOMP manager per codec thread (managers are not shared) and buffers for one group of chunks.
struct ThreadState {
  int level = -1;
  uint32_t chunk_bytes = 0;
  std::unique_ptr<nvcomp::LZ4CPUManager> mgr;
  std::vector<uint8_t> logical, shuffled, tmp;  // shuffled holds kGroupChunks chunks

  nvcomp::LZ4CPUManager& get(uint32_t cb, int lvl) {
    if (!mgr || cb != chunk_bytes || lvl != level) {
      mgr = std::make_unique<nvcomp::LZ4CPUManager>(cb, lvl, 1);
      chunk_bytes = cb;
      level = lvl;
      logical.resize(cb);
      shuffled.resize(uint64_t(cb) * kGroupChunks);
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

// Chunks per nvCOMP call: each manager call costs tens of microseconds (more than LZ4 on a 64 KiB chunk),
// so one batched call per group amortizes it; groups also spread a tensor over the pool's threads.
uint32_t group_size(uint32_t n_chunks, int threads) {
  const uint32_t even = (n_chunks + uint32_t(threads) - 1) / uint32_t(threads);
  return std::max(1u, std::min(kGroupChunks, even));
}

void check_status(const nvcompStatus_t* st, const char* what) {
  if (*st != nvcompSuccess) throw CodecError(std::string("nvCOMP LZ4 ") + what + " failed (status " +
                                             std::to_string(int(*st)) + ")");
}

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

  // Chunks [first, first + count) except `skip`: bit-shuffle each, one nvCOMP call for all, then
  // store raw what did not shrink and checksum the payloads.
  auto group = [&](uint32_t first, uint32_t count, uint32_t skip) {
    uint32_t at = first;
    try {
      ThreadState& ts = state();
      nvcomp::LZ4CPUManager& mgr = ts.get(chunk_bytes_, level_);
      std::vector<uint32_t> idx;
      std::vector<size_t> lens;
      std::vector<const uint8_t*> ins;
      std::vector<uint8_t*> outs;
      for (uint32_t i = first; i < first + count; ++i) {
        if (i == skip) continue;
        at = i;
        const uint32_t len = chunk_len(i, logical, chunk_bytes_);
        uint8_t* shuffled = ts.shuffled.data() + uint64_t(idx.size()) * chunk_bytes_;
        const uint8_t* in = gather(src, uint64_t(i) * chunk_bytes_, len, half, ts.logical.data());
        bitshuffle(in, shuffled, ts.tmp.data(), len / w, w);
        idx.push_back(i);
        lens.push_back(len);
        ins.push_back(shuffled);
        outs.push_back(slots_.data() + uint64_t(i) * slot_bytes_);
      }
      if (idx.empty()) return;
      at = idx.front();
      const std::vector<nvcomp::CompressionConfig> cfgs = mgr.configure_compression(lens);
      mgr.compress(ins.data(), outs.data(), cfgs);
      for (size_t k = 0; k < idx.size(); ++k) {
        at = idx[k];
        check_status(cfgs[k].get_status(), "compress");
        ChunkEntry& e = entries_[idx[k]];
        e.stored = stored_field(mgr.get_compressed_output_size(outs[k]), uint32_t(lens[k]));
        if (e.stored & kRawFlag) std::memcpy(outs[k], ins[k], lens[k]);
        e.crc = crc(outs[k], payload_len(e.stored));
      }
    } catch (const std::exception& e) {
      int expect = -1;
      if (failed.compare_exchange_strong(expect, int(at))) why = e.what();
    }
  };
  auto fail = [&] {
    throw CodecError("nvCOMP LZ4 compress failed on chunk " + std::to_string(failed.load()) + ": " + why);
  };

  if (n == 0) {
    blob_bytes_ = table_bytes(0);
    return blob_bytes_;
  }
  // Probe the middle chunk: tensors that do not compress cost one chunk of codec time, not all.
  const uint32_t probe = n / 2;
  group(probe, 1, n);
  if (failed.load() >= 0) fail();
  const double ratio = double(chunk_len(probe, logical, chunk_bytes_)) / payload_len(entries_[probe].stored);
  if (ratio < min_ratio) return 0;

  const uint32_t g = group_size(n, pool_->threads());
  pool_->run((n + g - 1) / g, [&](int64_t k) {
    const uint32_t first = uint32_t(k) * g;
    group(first, std::min(g, n - first), probe);
  });
  if (failed.load() >= 0) fail();
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
  if (h.width != w || h.chunk_bytes != chunk_bytes_ || ((h.flags & kFlagHalf) != 0) != half)
    throw CodecError(std::string("corrupt blob: ") + reasons[2]);
  std::vector<uint64_t> offsets(h.n_chunks);
  plan_offsets(entries.data(), h.n_chunks, offsets.data());

  // Per group: verify every payload's crc, one nvCOMP call for the LZ4 chunks, then un-shuffle into dst.
  std::atomic<int> failed{-1};
  std::string why;
  const uint32_t g = group_size(h.n_chunks, pool_->threads());
  pool_->run(int64_t((h.n_chunks + g - 1) / g), [&](int64_t k) {
    const uint32_t first = uint32_t(k) * g, last = std::min(h.n_chunks, first + g);
    uint32_t at = first;
    try {
      ThreadState& ts = state();
      nvcomp::LZ4CPUManager& mgr = ts.get(chunk_bytes_, level_);
      std::vector<uint32_t> idx;
      std::vector<const uint8_t*> ins;
      std::vector<uint8_t*> outs;
      std::vector<size_t> sizes;
      for (uint32_t i = first; i < last; ++i) {
        at = i;
        const ChunkDesc d = describe_chunk(i, entries.data(), offsets.data(), 0);
        if (crc(blob + d.dst, d.len) != entries[i].crc) throw CodecError("crc32 mismatch");
        if (d.raw) continue;
        idx.push_back(i);
        ins.push_back(blob + d.dst);
        outs.push_back(ts.shuffled.data() + uint64_t(i - first) * h.chunk_bytes);
        sizes.push_back(d.len);
      }
      if (!idx.empty()) {
        at = idx.front();
        const std::vector<nvcomp::DecompressionConfig> cfgs = mgr.configure_decompression(ins.data(), ins.size(),
                                                                                           sizes.data());
        for (size_t j = 0; j < idx.size(); ++j) {
          at = idx[j];
          if (cfgs[j].decomp_data_size != chunk_len(idx[j], logical, h.chunk_bytes))
            throw CodecError("LZ4 chunk has the wrong decompressed size");
        }
        at = idx.front();
        mgr.decompress(outs.data(), ins.data(), cfgs, sizes.data());
        for (size_t j = 0; j < idx.size(); ++j) {
          at = idx[j];
          check_status(cfgs[j].get_status(), "decompress");
        }
      }
      for (uint32_t i = first; i < last; ++i) {
        at = i;
        const uint32_t len = chunk_len(i, logical, h.chunk_bytes);
        const ChunkDesc d = describe_chunk(i, entries.data(), offsets.data(), 0);
        const uint8_t* shuffled = d.raw ? blob + d.dst : ts.shuffled.data() + uint64_t(i - first) * h.chunk_bytes;
        uint8_t* logical_out = half ? ts.logical.data() : dst + uint64_t(i) * h.chunk_bytes;
        bitunshuffle(shuffled, logical_out, ts.tmp.data(), len / w, w);
        if (half) scatter(logical_out, dst, uint64_t(i) * h.chunk_bytes, len, true);
      }
    } catch (const std::exception& e) {
      int expect = -1;
      if (failed.compare_exchange_strong(expect, int(at))) why = e.what();
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
