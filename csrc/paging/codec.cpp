#include "paging/codec.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
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


// A tensor's logical stream as compress and decompress walk it: chunk i holds len(i) bytes of
// `width`-byte elements; the planes in `mask` go through LZ4.
struct Stream {
  uint64_t logical;
  uint32_t width;
  bool half;
  uint32_t mask;
  uint32_t chunk_bytes;

  uint32_t len(uint32_t i) const { return chunk_len(i, logical, chunk_bytes); }
  uint32_t n8(uint32_t i) const {  // elements of chunk i that are bit-shuffled (the rest is its tail)
    const uint32_t ne = len(i) / width;
    return ne - ne % 8;
  }
  uint32_t raw_planes(uint32_t i) const { return raw_plane_bytes(len(i), width, mask); }
  uint32_t tail(uint32_t i) const { return tail_bytes(len(i), width); }
};

// One group's LZ4 sections, for one batched nvCOMP call.
struct Batch {
  std::vector<uint32_t> idx;  // chunk numbers
  std::vector<size_t> lens;   // input bytes
  std::vector<const uint8_t*> ins;
  std::vector<uint8_t*> outs;

  void add(uint32_t i, const uint8_t* in, uint8_t* out, size_t len) {
    idx.push_back(i);
    ins.push_back(in);
    outs.push_back(out);
    lens.push_back(len);
  }
};

// compress()'s output: one fixed-size slot and one table entry per chunk.
struct Slots {
  uint8_t* data;
  uint64_t slot_bytes;
  ChunkEntry* entries;
  uint8_t* slot(uint32_t i) const { return data + uint64_t(i) * slot_bytes; }
};

// decompress()'s input: a validated blob, its chunk table and each payload's offset.
struct Blob {
  const uint8_t* data;
  const ChunkEntry* entries;
  const uint64_t* offsets;
  ChunkDesc chunk(uint32_t i) const { return describe_chunk(i, entries, offsets, 0); }
};

// Runs group(first, last, at) over the groups of n chunks on the pool. `at` follows the chunk being
// worked on, so a failure names it: returns the first failing chunk and its message, or -1.
std::pair<int, std::string> run_groups(const Pool& pool, uint32_t n,
                                       const std::function<void(uint32_t, uint32_t, uint32_t&)>& group) {
  std::atomic<int> failed{-1};
  std::string why;
  const uint32_t g = group_size(n, pool.threads());
  pool.run(int64_t((n + g - 1) / g), [&](int64_t k) {
    const uint32_t first = uint32_t(k) * g, last = std::min(n, first + g);
    uint32_t at = first;
    try {
      group(first, last, at);
    } catch (const std::exception& e) {
      int expect = -1;
      if (failed.compare_exchange_strong(expect, int(at))) why = e.what();
    }
  });
  return {failed.load(), why};
}

// Chunk i's byte planes: raw ones straight into its slot, LZ4 ones bit-shuffled into `shuffled` and
// queued on the batch; its tail goes to `tail`. A chunk of fewer than 8 elements is stored raw at once.
void stage_chunk(const uint8_t* src, const Stream& s, uint32_t i, const Slots& out, ThreadState& ts,
                 uint8_t* shuffled, uint8_t* tail, Batch& lz4) {
  const uint32_t len = s.len(i), n8 = s.n8(i);
  const uint8_t* in = gather(src, uint64_t(i) * s.chunk_bytes, len, s.half, ts.logical.data());
  uint8_t* slot = out.slot(i);
  uint8_t* where[kMaxWidth] = {};
  place_planes(slot, ts.planes.data(), s.width, s.mask, n8, where);
  byte_transpose(in, where, n8, s.width);
  std::memcpy(tail, in + uint64_t(n8) * s.width, s.tail(i));
  for (uint32_t j = 0, b = 0; b < s.width; ++b)
    if (s.mask >> b & 1u) bit_transpose(where[b], shuffled + uint64_t(j++) * n8, n8);
  if (n8 == 0) {  // nothing to LZ4
    std::memcpy(slot, tail, len);
    out.entries[i] = ChunkEntry{len | kRawFlag, crc32c(slot, len)};
    return;
  }
  lz4.add(i, shuffled, slot + s.raw_planes(i), uint64_t(popcount32(s.mask)) * n8);
}

// Chunk i's table entry once LZ4 made `section` bytes of its j-th batch input: the input as is when
// that does not shrink the chunk, then the tail after the section and the CRC-32C of the payload.
void finish_chunk(const Stream& s, const Batch& lz4, size_t j, uint64_t section, const uint8_t* tail,
                  const Slots& out) {
  const uint32_t i = lz4.idx[j], planes = s.raw_planes(i), tb = s.tail(i);
  ChunkEntry& e = out.entries[i];
  e.stored = stored_field(planes + section + tb, s.len(i));
  if (e.stored & kRawFlag) {
    std::memcpy(lz4.outs[j], lz4.ins[j], lz4.lens[j]);
    section = lz4.lens[j];
  }
  std::memcpy(lz4.outs[j] + section, tail, tb);
  e.crc = crc32c(lz4.outs[j] - planes, payload_len(e.stored));
}

// One group of chunks: stage each, one nvCOMP call for the group's LZ4 sections, then finish each.
void compress_group(const uint8_t* src, const Stream& s, int level, const Slots& out, uint32_t first,
                    uint32_t last, uint32_t& at) {
  ThreadState& ts = state();
  nvcomp::LZ4CPUManager& mgr = ts.get(s.chunk_bytes, level);
  Batch lz4;
  uint8_t tail[8 * kMaxWidth];  // only a tensor's last chunk has one, and it is last in its group
  for (uint32_t i = first; i < last; ++i) {
    at = i;
    stage_chunk(src, s, i, out, ts, ts.shuffled.data() + uint64_t(i - first) * s.chunk_bytes, tail, lz4);
  }
  if (lz4.idx.empty()) return;
  at = lz4.idx.front();
  const std::vector<nvcomp::CompressionConfig> cfgs = mgr.configure_compression(lz4.lens);
  mgr.compress(lz4.ins.data(), lz4.outs.data(), cfgs);
  for (size_t j = 0; j < lz4.idx.size(); ++j) {
    at = lz4.idx[j];
    check_status(cfgs[j].get_status(), "compress");
    finish_chunk(s, lz4, j, mgr.get_compressed_output_size(lz4.outs[j]), tail, out);
  }
}

const char* const kCorrupt[] = {"", "bad magic (not a forge_rt blob)", "header does not match the tensor",
                                "blob size does not match its chunk table (truncated?)",
                                "raw chunk has the wrong length", "LZ4 chunk is shorter than its raw section"};

CodecError corrupt(int reason) { return CodecError(std::string("corrupt blob: ") + kCorrupt[reason]); }

// Chunk i's CRC-32C checked; its LZ4 section, if any, queued to decompress into `shuffled`.
void collect_chunk(const Blob& blob, const Stream& s, uint32_t i, uint8_t* shuffled, Batch& lz4) {
  const ChunkDesc d = blob.chunk(i);
  if (crc32c(blob.data + d.dst, d.len) != blob.entries[i].crc) throw CodecError("CRC-32C mismatch");
  if (d.raw) return;
  const uint32_t raw = s.raw_planes(i) + s.tail(i);
  if (d.len <= raw) throw corrupt(5);
  lz4.add(i, blob.data + d.dst + s.raw_planes(i), shuffled, d.len - raw);
}

// One nvCOMP call for a group's LZ4 sections, each checked to restore exactly its chunk's planes.
void decompress_batch(nvcomp::LZ4CPUManager& mgr, const Stream& s, const Batch& lz4, uint32_t& at) {
  at = lz4.idx.front();
  const std::vector<nvcomp::DecompressionConfig> cfgs =
      mgr.configure_decompression(lz4.ins.data(), lz4.ins.size(), lz4.lens.data());
  for (size_t j = 0; j < lz4.idx.size(); ++j) {
    at = lz4.idx[j];
    if (cfgs[j].decomp_data_size != s.len(at) - s.raw_planes(at) - s.tail(at))
      throw CodecError("LZ4 chunk has the wrong decompressed size");
  }
  at = lz4.idx.front();
  mgr.decompress(lz4.outs.data(), lz4.ins.data(), cfgs, lz4.lens.data());
  for (size_t j = 0; j < lz4.idx.size(); ++j) {
    at = lz4.idx[j];
    check_status(cfgs[j].get_status(), "decompress");
  }
}

// Chunk i back into dst: LZ4'd planes bit-unshuffled from `shuffled` (or read from a raw payload),
// the other planes read from the payload, byte-untransposed, then the tail.
void restore_chunk(const Blob& blob, const Stream& s, uint32_t i, const uint8_t* shuffled, ThreadState& ts,
                   uint8_t* dst) {
  const uint32_t len = s.len(i), n8 = s.n8(i);
  const ChunkDesc d = blob.chunk(i);
  const uint8_t* payload = blob.data + d.dst;
  const uint8_t* section = d.raw ? payload + s.raw_planes(i) : shuffled;
  const uint8_t* where[kMaxWidth] = {};
  place_planes<const uint8_t*>(payload, ts.planes.data(), s.width, s.mask, n8, where);
  for (uint32_t j = 0; j < popcount32(s.mask); ++j)
    bit_untranspose(section + uint64_t(j) * n8, ts.planes.data() + uint64_t(j) * n8, n8);
  uint8_t* out = s.half ? ts.logical.data() : dst + uint64_t(i) * s.chunk_bytes;
  byte_untranspose(where, out, n8, s.width);
  std::memcpy(out + uint64_t(n8) * s.width, payload + d.len - s.tail(i), s.tail(i));
  if (s.half) scatter(out, dst, uint64_t(i) * s.chunk_bytes, len);
}

// One group of chunks: every CRC checked, one nvCOMP call for the LZ4 sections, every chunk restored.
void decompress_group(const Blob& blob, const Stream& s, int level, uint8_t* dst, uint32_t first, uint32_t last,
                      uint32_t& at) {
  ThreadState& ts = state();
  nvcomp::LZ4CPUManager& mgr = ts.get(s.chunk_bytes, level);
  auto shuffled = [&](uint32_t i) { return ts.shuffled.data() + uint64_t(i - first) * s.chunk_bytes; };
  Batch lz4;
  for (uint32_t i = first; i < last; ++i) {
    at = i;
    collect_chunk(blob, s, i, shuffled(i), lz4);
  }
  if (!lz4.idx.empty()) decompress_batch(mgr, s, lz4, at);
  for (uint32_t i = first; i < last; ++i) {
    at = i;
    restore_chunk(blob, s, i, shuffled(i), ts, dst);
  }
}

}  // namespace

Codec::Codec(int threads, int level, uint32_t chunk_bytes)
    : level_(level), chunk_bytes_(chunk_bytes), pool_(threads) {
  if (chunk_bytes == 0 || chunk_bytes % 64 != 0) throw CodecError("chunk_bytes must be a positive multiple of 64");
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
  const uint32_t w = stream.second;
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
  const Stream s{logical, w, half, mask, chunk_bytes_};
  const Slots out{slots_.data(), slot_bytes_, entries_.data()};
  const std::pair<int, std::string> failed = run_groups(pool_, n, [&](uint32_t first, uint32_t last, uint32_t& at) {
    compress_group(src, s, level_, out, first, last, at);
  });
  if (failed.first >= 0)
    throw CodecError("nvCOMP LZ4 compress failed on chunk " + std::to_string(failed.first) + ": " + failed.second);
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
  if (blob_bytes < table_bytes(0) || (h.magic == kBlobMagic && blob_bytes < table_bytes(h.n_chunks))) throw corrupt(3);
  std::vector<ChunkEntry> entries(h.magic == kBlobMagic ? h.n_chunks : 0);
  if (!entries.empty()) std::memcpy(entries.data(), blob + sizeof(BlobHeader), entries.size() * sizeof(ChunkEntry));
  const int bad = check_table(h, entries.data(), blob_bytes, logical);
  if (bad) throw corrupt(bad);
  if (h.width != w || w > kMaxWidth || h.chunk_bytes != chunk_bytes_ || ((h.flags & kFlagHalf) != 0) != half ||
      (h.flags & kFlagGpu) || (h.n_chunks && (h.lz4_planes == 0 || h.lz4_planes >> w)))
    throw corrupt(2);
  std::vector<uint64_t> offsets(h.n_chunks);
  plan_offsets(entries.data(), h.n_chunks, offsets.data());
  const Stream s{logical, w, half, h.lz4_planes, h.chunk_bytes};
  const Blob in{blob, entries.data(), offsets.data()};
  const std::pair<int, std::string> failed =
      run_groups(pool_, h.n_chunks, [&](uint32_t first, uint32_t last, uint32_t& at) {
        decompress_group(in, s, level_, dst, first, last, at);
      });
  if (failed.first >= 0)
    throw CodecError("chunk " + std::to_string(failed.first) + " of " + std::to_string(h.n_chunks) + ": " +
                     failed.second);
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
