#include "paging/codec.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>

#include "nvcomp_cpu.hpp"
#include "paging/bitshuffle.h"
#include "paging/crc32c.h"
#ifdef FORGE_RT_X86_DISPATCH
#include "cpu_path.h"
#include "paging/simd_avx2.h"
#endif

namespace forge_paging {
namespace {

constexpr uint32_t kGroupChunks = 32;

// One nvCOMP manager per codec thread (managers are not shared) and buffers for one group of chunks.
struct ThreadState {
  int level = -1;
  uint32_t chunk_bytes = 0;
  std::unique_ptr<nvcomp::LZ4CPUManager> mgr;
  std::vector<uint8_t> logical, planes, shuffled;  // shuffled holds kGroupChunks chunks

  nvcomp::LZ4CPUManager& get(uint32_t cb, int lvl) {
    if (!mgr || cb != chunk_bytes || lvl != level) {
      mgr = std::make_unique<nvcomp::LZ4CPUManager>(cb, lvl, 1);
      chunk_bytes = cb;
      level = lvl;
      logical.resize(cb);
      planes.resize(cb);
      shuffled.resize(uint64_t(cb) * kGroupChunks);
    }
    return *mgr;
  }
};

ThreadState& state() {
  thread_local ThreadState s;
  return s;
}

// Chunks per nvCOMP call: each manager call costs tens of microseconds (more than LZ4 on a 64 KiB chunk),
// so one batched call per group amortizes it. Groups come in a multiple of the thread count so no
// thread idles at the end (96 chunks as 32+32+32 on 2 threads would take 2/3 longer than 4 x 24).
uint32_t group_size(uint32_t n_chunks, int threads) {
  const uint32_t t = uint32_t(threads);
  if (n_chunks == 0) return 1;
  const uint32_t groups = t * ((n_chunks + t * kGroupChunks - 1) / (t * kGroupChunks));
  return std::max(1u, (n_chunks + groups - 1) / groups);
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

void scatter(const uint8_t* logical, uint8_t* dst, uint64_t off, uint32_t len) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(logical);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst) + off / 2;
  for (uint32_t k = 0; k < len / 2; ++k) d[k] = uint32_t(s[k]) << 16;
}

// Where each byte plane of a chunk lives: planes in `mask` in `lz4_planes` (n8 bytes each, plane
// order), the others one after another from `raw`.
template <class P>
void place_planes(P raw, P lz4_planes, uint32_t width, uint32_t mask, uint32_t n8, P* where) {
  uint32_t k = 0;
  for (uint32_t b = 0; b < width; ++b) {
    if (mask >> b & 1u) {
      where[b] = lz4_planes + uint64_t(k++) * n8;
    } else {
      where[b] = raw;
      raw += n8;
    }
  }
}

}  // namespace

Codec::Codec(int threads, int level, uint32_t chunk_bytes)
    : level_(level), chunk_bytes_(chunk_bytes), pool_(threads) {
  if (chunk_bytes == 0 || chunk_bytes % 64 != 0) throw CodecError("chunk_bytes must be a positive multiple of 64");
  // A slot holds the raw section plus LZ4 of the rest; the whole chunk plus LZ4's bound covers both.
  // A slot holds [raw planes][LZ4 of the rest][tail]. nvCOMP's HLIF bound is the same for any input
  // up to a chunk, so the slot is a chunk (raw planes + tail) plus that bound; 64-byte slots keep
  // nvCOMP's outputs 8-byte aligned.
  const uint64_t bound = state().get(chunk_bytes_, level_).configure_compression(chunk_bytes_).max_compressed_buffer_size;
  slot_bytes_ = (chunk_bytes_ + bound + 63) / 64 * 64;
}

// LZ4s each byte plane of chunk `chunk` on its own and returns the mask of planes that shrink to
// kPlaneKeep or less, or 0 when the chunk as a whole would shrink by less than min_ratio; with
// min_ratio <= 1 the tensor is always compressed (all planes when none shrinks).
uint32_t Codec::probe_planes(const uint8_t* src, uint32_t chunk, uint64_t logical, uint32_t width, bool half,
                             double min_ratio) {
  ThreadState& ts = state();
  nvcomp::LZ4CPUManager& mgr = ts.get(chunk_bytes_, level_);
  const uint32_t len = chunk_len(chunk, logical, chunk_bytes_), n = len / width, n8 = n - n % 8;
  const uint32_t all = (1u << width) - 1;
  if (n8 == 0) return min_ratio <= 1.0 ? all : 0;
  uint8_t* where[kMaxWidth] = {};
  place_planes<uint8_t*>(nullptr, ts.planes.data(), width, all, n8, where);
  byte_transpose(gather(src, uint64_t(chunk) * chunk_bytes_, len, half, ts.logical.data()), where, n8, width);
  std::vector<const uint8_t*> ins;
  std::vector<uint8_t*> outs;
  for (uint32_t b = 0; b < width; ++b) {
    bit_transpose(where[b], ts.shuffled.data() + uint64_t(b) * n8, n8);
    ins.push_back(ts.shuffled.data() + uint64_t(b) * n8);
    outs.push_back(slots_.data() + uint64_t(b) * slot_bytes_);
  }
  const std::vector<nvcomp::CompressionConfig> cfgs = mgr.configure_compression(std::vector<size_t>(width, n8));
  mgr.compress(ins.data(), outs.data(), cfgs);
  uint32_t mask = 0;
  uint64_t saved = 0;
  for (uint32_t b = 0; b < width; ++b) {
    check_status(cfgs[b].get_status(), "compress");
    const uint64_t out = mgr.get_compressed_output_size(outs[b]);
    if (double(out) <= kPlaneKeep * n8) {
      mask |= 1u << b;
      saved += n8 - out;
    }
  }
  if (min_ratio <= 1.0) return mask ? mask : all;  // compress whatever comes (tests, the ratio bench)
  return double(len) / double(len - saved) < min_ratio ? 0 : mask;
}

// The logical stream the codec sees: the tensor's bytes, or the high halves of fp32s when half.
std::pair<uint64_t, uint32_t> Codec::logical_stream(uint64_t nbytes, uint32_t width, bool half) const {
  const uint32_t w = half ? 2 : width;
  if (w == 0 || w > kMaxWidth || chunk_bytes_ % w != 0)
    throw CodecError("element width " + std::to_string(w) + " is not supported (1..16 bytes dividing the chunk)");
  return {half ? nbytes / 2 : nbytes, w};
}

uint64_t Codec::compress(const uint8_t* src, uint64_t nbytes, uint32_t width, bool half, double min_ratio,
                         uint32_t lz4_planes) {
  const std::pair<uint64_t, uint32_t> stream = logical_stream(nbytes, width, half);
  const uint64_t logical = stream.first;
  const uint32_t w = stream.second;  // plain names: lambdas below capture them (C++17)
  const uint32_t n = n_chunks_for(logical, chunk_bytes_);
  slots_.resize(uint64_t(std::max(n, w)) * slot_bytes_);
  entries_.assign(n, ChunkEntry{0, 0});
  offsets_.assign(n, 0);
  header_ = BlobHeader{kBlobMagic, n, chunk_bytes_, w, logical, half ? kFlagHalf : 0u, 0u};
  if (n == 0) {
    blob_bytes_ = table_bytes(0);
    return blob_bytes_;
  }
  // Probe the middle chunk: a tensor that does not compress costs one chunk of codec time, not all.
  uint32_t mask = lz4_planes & ((1u << w) - 1);
  if (mask == 0) mask = probe_planes(src, n / 2, logical, w, half, min_ratio);
  if (mask == 0) return 0;
  header_.lz4_planes = mask;
  std::atomic<int> failed{-1};
  std::string why;
  // One group of chunks: raw planes straight into their slots, the others bit-shuffled into the
  // group buffer, one nvCOMP call for the group, then raw what did not shrink, tails, and crc32s.
  const uint32_t g = group_size(n, pool_.threads());
  auto group = [&](int64_t k) {
    const uint32_t first = uint32_t(k) * g, last = std::min(n, first + g);
    uint32_t at = first;
    try {
      ThreadState& ts = state();
      nvcomp::LZ4CPUManager& mgr = ts.get(chunk_bytes_, level_);
      std::vector<uint32_t> idx;
      std::vector<size_t> lens;
      std::vector<const uint8_t*> ins;
      std::vector<uint8_t*> outs;
      uint8_t tail[8 * kMaxWidth];  // only a tensor's last chunk has one, and it is last in its group
      for (uint32_t i = first; i < last; ++i) {
        at = i;
        const uint32_t len = chunk_len(i, logical, chunk_bytes_), ne = len / w, n8 = ne - ne % 8;
        const uint8_t* in = gather(src, uint64_t(i) * chunk_bytes_, len, half, ts.logical.data());
        uint8_t* slot = slots_.data() + uint64_t(i) * slot_bytes_;
        uint8_t* where[kMaxWidth] = {};
        place_planes(slot, ts.planes.data(), w, mask, n8, where);
        byte_transpose(in, where, n8, w);
        std::memcpy(tail, in + uint64_t(n8) * w, tail_bytes(len, w));
        uint8_t* shuffled = ts.shuffled.data() + uint64_t(i - first) * chunk_bytes_;
        for (uint32_t j = 0, b = 0; b < w; ++b)
          if (mask >> b & 1u) bit_transpose(where[b], shuffled + uint64_t(j++) * n8, n8);
        if (n8 == 0) {  // a chunk of fewer than 8 elements: nothing to LZ4
          std::memcpy(slot, tail, len);
          entries_[i] = ChunkEntry{len | kRawFlag, crc32c(slot, len)};
          continue;
        }
        idx.push_back(i);
        lens.push_back(uint64_t(popcount32(mask)) * n8);
        ins.push_back(shuffled);
        outs.push_back(slot + raw_plane_bytes(len, w, mask));
      }
      if (idx.empty()) return;
      at = idx.front();
      const std::vector<nvcomp::CompressionConfig> cfgs = mgr.configure_compression(lens);
      mgr.compress(ins.data(), outs.data(), cfgs);
      for (size_t j = 0; j < idx.size(); ++j) {
        at = idx[j];
        check_status(cfgs[j].get_status(), "compress");
        const uint32_t len = chunk_len(idx[j], logical, chunk_bytes_), planes = raw_plane_bytes(len, w, mask);
        const uint32_t tb = tail_bytes(len, w);
        ChunkEntry& e = entries_[idx[j]];
        uint64_t section = mgr.get_compressed_output_size(outs[j]);
        e.stored = stored_field(planes + section + tb, len);
        if (e.stored & kRawFlag) {
          std::memcpy(outs[j], ins[j], lens[j]);
          section = lens[j];
        }
        std::memcpy(outs[j] + section, tail, tb);
        e.crc = crc32c(outs[j] - planes, payload_len(e.stored));
      }
    } catch (const std::exception& e) {
      int expect = -1;
      if (failed.compare_exchange_strong(expect, int(at))) why = e.what();
    }
  };
  pool_.run((n + g - 1) / g, group);
  if (failed.load() >= 0)
    throw CodecError("nvCOMP LZ4 compress failed on chunk " + std::to_string(failed.load()) + ": " + why);
  blob_bytes_ = plan_offsets(entries_.data(), n, offsets_.data());
  return blob_bytes_;
}

uint32_t Codec::probe(const uint8_t* src, uint64_t nbytes, uint32_t width, bool half, double min_ratio) {
  const std::pair<uint64_t, uint32_t> stream = logical_stream(nbytes, width, half);
  const uint64_t logical = stream.first;
  const uint32_t w = stream.second;  // plain names: lambdas below capture them (C++17)
  const uint32_t n = n_chunks_for(logical, chunk_bytes_);
  if (n == 0) return (1u << w) - 1;
  slots_.resize(std::max<uint64_t>(slots_.size(), uint64_t(w) * slot_bytes_));
  return probe_planes(src, n / 2, logical, w, half, min_ratio);
}

void Codec::take(uint8_t* dst) {
  std::memcpy(dst, &header_, sizeof(header_));
  std::memcpy(dst + sizeof(header_), entries_.data(), entries_.size() * sizeof(ChunkEntry));
  pool_.run(int64_t(entries_.size()), [&](int64_t i) {
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
                                  "raw chunk has the wrong length", "LZ4 chunk is shorter than its raw section"};
  if (blob_bytes < table_bytes(0) || (h.magic == kBlobMagic && blob_bytes < table_bytes(h.n_chunks)))
    throw CodecError(std::string("corrupt blob: ") + reasons[3]);
  std::vector<ChunkEntry> entries(h.magic == kBlobMagic ? h.n_chunks : 0);
  if (!entries.empty()) std::memcpy(entries.data(), blob + sizeof(BlobHeader), entries.size() * sizeof(ChunkEntry));
  const int bad = check_table(h, entries.data(), blob_bytes, logical);
  if (bad) throw CodecError(std::string("corrupt blob: ") + reasons[bad]);
  if (h.width != w || w > kMaxWidth || h.chunk_bytes != chunk_bytes_ || ((h.flags & kFlagHalf) != 0) != half ||
      (h.flags & kFlagGpu) || (h.n_chunks && (h.lz4_planes == 0 || h.lz4_planes >> w)))
    throw CodecError(std::string("corrupt blob: ") + reasons[2]);
  std::vector<uint64_t> offsets(h.n_chunks);
  plan_offsets(entries.data(), h.n_chunks, offsets.data());
  const uint32_t mask = h.lz4_planes;

  // Per group: verify every payload's crc, one nvCOMP call for the LZ4 sections, then put the
  // planes back: LZ4'd ones bit-unshuffled, raw ones read from the blob, and byte-untranspose into dst.
  std::atomic<int> failed{-1};
  std::string why;
  const uint32_t g = group_size(h.n_chunks, pool_.threads());
  pool_.run(int64_t((h.n_chunks + g - 1) / g), [&](int64_t k) {
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
        if (crc32c(blob + d.dst, d.len) != entries[i].crc) throw CodecError("CRC-32C mismatch");
        const uint32_t len = chunk_len(i, logical, h.chunk_bytes);
        const uint32_t raw = raw_plane_bytes(len, w, mask) + tail_bytes(len, w);
        if (d.raw) continue;
        if (d.len <= raw) throw CodecError(std::string("corrupt blob: ") + reasons[5]);
        idx.push_back(i);
        ins.push_back(blob + d.dst + raw_plane_bytes(len, w, mask));
        outs.push_back(ts.shuffled.data() + uint64_t(i - first) * h.chunk_bytes);
        sizes.push_back(d.len - raw);
      }
      if (!idx.empty()) {
        at = idx.front();
        const std::vector<nvcomp::DecompressionConfig> cfgs = mgr.configure_decompression(ins.data(), ins.size(),
                                                                                           sizes.data());
        for (size_t j = 0; j < idx.size(); ++j) {
          at = idx[j];
          const uint32_t len = chunk_len(idx[j], logical, h.chunk_bytes);
          if (cfgs[j].decomp_data_size != len - raw_plane_bytes(len, w, mask) - tail_bytes(len, w))
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
        const uint32_t len = chunk_len(i, logical, h.chunk_bytes), ne = len / w, n8 = ne - ne % 8;
        const ChunkDesc d = describe_chunk(i, entries.data(), offsets.data(), 0);
        const uint8_t* payload = blob + d.dst;
        const uint8_t* section =
            d.raw ? payload + raw_plane_bytes(len, w, mask) : ts.shuffled.data() + uint64_t(i - first) * h.chunk_bytes;
        const uint8_t* tail = payload + d.len - tail_bytes(len, w);
        const uint8_t* where[kMaxWidth] = {};
        place_planes<const uint8_t*>(payload, ts.planes.data(), w, mask, n8, where);
        for (uint32_t j = 0; j < popcount32(mask); ++j)
          bit_untranspose(section + uint64_t(j) * n8, ts.planes.data() + uint64_t(j) * n8, n8);
        uint8_t* out = half ? ts.logical.data() : dst + uint64_t(i) * h.chunk_bytes;
        byte_untranspose(where, out, n8, w);
        std::memcpy(out + uint64_t(n8) * w, tail, uint64_t(ne - n8) * w);
        if (half) scatter(out, dst, uint64_t(i) * h.chunk_bytes, len);
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
#ifdef FORGE_RT_X86_DISPATCH
  if (forge_cpu::avx2() && !avx2::low16_zero_blocks(x, n, &i)) return false;
#endif
  for (; i < n; ++i)
    if (x[i] & 0xFFFFu) return false;
  return true;
}

}  // namespace forge_paging
