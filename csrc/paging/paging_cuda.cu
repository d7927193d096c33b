// nvCOMP batched LZ4 + compaction kernels. Per-chunk logic is in blob_hd.h (tested on the CPU).
#include <cuda_runtime.h>
#include <nvcomp/lz4.h>

#include "paging/blob_hd.h"
#include "paging/paging_cuda.h"

namespace forge_paging {
namespace {

constexpr int kThreads = 256;

size_t align_up(size_t x) { return (x + 255) & ~size_t(255); }

nvcompType_t type_of(uint32_t width) {
  return width == 2 ? NVCOMP_TYPE_SHORT : width == 4 ? NVCOMP_TYPE_INT : width == 8 ? NVCOMP_TYPE_LONGLONG
                                                                                    : NVCOMP_TYPE_CHAR;
}

// Scratch: [ptrs in][sizes in][ptrs out][sizes out][statuses][entries][offsets][nvCOMP temp][slots]
struct Scratch {
  const void** in;
  size_t* in_bytes;
  void** out;
  size_t* out_bytes;
  nvcompStatus_t* status;
  ChunkEntry* entries;
  uint64_t* offsets;
  void* temp;
  size_t temp_bytes;
  uint8_t* slots;
  size_t slot_bytes;
};

nvcompBatchedLZ4CompressOpts_t comp_opts(uint32_t width) {
  nvcompBatchedLZ4CompressOpts_t o = nvcompBatchedLZ4CompressDefaultOpts;
  o.data_type = type_of(width);
  o.bitshuffle_mode = width > 1 ? NVCOMP_BITSHUFFLE_LSB_FIRST : NVCOMP_BITSHUFFLE_NONE;
  return o;
}

size_t layout(Scratch* s, uint8_t* base, uint32_t n, uint32_t width, uint32_t chunk_bytes, uint64_t nbytes) {
  size_t at = 0;
  auto take = [&](size_t bytes) { uint8_t* p = base ? base + at : nullptr; at += align_up(bytes); return p; };
  s->in = reinterpret_cast<const void**>(take(n * sizeof(void*)));
  s->in_bytes = reinterpret_cast<size_t*>(take(n * sizeof(size_t)));
  s->out = reinterpret_cast<void**>(take(n * sizeof(void*)));
  s->out_bytes = reinterpret_cast<size_t*>(take(n * sizeof(size_t)));
  s->status = reinterpret_cast<nvcompStatus_t*>(take(n * sizeof(nvcompStatus_t)));
  s->entries = reinterpret_cast<ChunkEntry*>(take(n * sizeof(ChunkEntry)));
  s->offsets = reinterpret_cast<uint64_t*>(take(n * sizeof(uint64_t)));
  size_t temp = 0, dtemp = 0;
  nvcompBatchedLZ4CompressGetTempSize(n, chunk_bytes, comp_opts(width), &temp, nbytes, nullptr);
  nvcompBatchedLZ4DecompressOpts_t d = nvcompBatchedLZ4DecompressDefaultOpts;
  nvcompBatchedLZ4DecompressGetTempSize(n, chunk_bytes, d, &dtemp, nbytes, nullptr);
  s->temp_bytes = temp > dtemp ? temp : dtemp;
  temp = s->temp_bytes;
  s->temp = take(temp);
  size_t slot = 0;
  nvcompBatchedLZ4CompressGetMaxOutputChunkSize(chunk_bytes, comp_opts(width), &slot);
  s->slot_bytes = align_up(slot);
  s->slots = take(size_t(n) * s->slot_bytes);
  return at;
}

__global__ void fill_ptrs(const uint8_t* src, uint64_t nbytes, uint32_t chunk_bytes, uint32_t n, Scratch s) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  s.in[i] = src + uint64_t(i) * chunk_bytes;
  s.in_bytes[i] = chunk_len(i, nbytes, chunk_bytes);
  s.out[i] = s.slots + uint64_t(i) * s.slot_bytes;
}

// One thread: entries from nvCOMP's sizes, offsets by exclusive scan, header + table into the blob.
__global__ void plan(Scratch s, uint32_t n, uint64_t nbytes, uint32_t width, uint32_t chunk_bytes, uint8_t* blob,
                     uint64_t* blob_bytes) {
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t len = chunk_len(i, nbytes, chunk_bytes);
    const bool ok = s.status[i] == nvcompSuccess;
    s.entries[i].stored = stored_field(ok ? s.out_bytes[i] : len, len);
    s.entries[i].crc = 0;
  }
  *blob_bytes = plan_offsets(s.entries, n, s.offsets);
  BlobHeader h{kBlobMagic, n, chunk_bytes, width, nbytes, kFlagGpu, 0u};
  const uint8_t* hp = reinterpret_cast<const uint8_t*>(&h);
  for (uint32_t k = 0; k < sizeof(h); ++k) blob[k] = hp[k];
}

// One block per chunk: copy the payload (LZ4 slot, or the input chunk when stored raw), then CRC-32C.
__global__ void compact(Scratch s, const uint8_t* src, uint32_t chunk_bytes, uint8_t* blob) {
  const uint32_t i = blockIdx.x;
  ChunkDesc d = describe_chunk(i, s.entries, s.offsets, s.slot_bytes);
  const uint8_t* from = s.slots;
  if (d.raw) {
    from = src;
    d.src = uint64_t(i) * chunk_bytes;
  }
  copy_lane(blob, from, d, threadIdx.x, blockDim.x);
  __syncthreads();
  if (threadIdx.x == 0) {
    s.entries[i].crc = crc32c_update(0, blob + d.dst, d.len);
    const uint8_t* ep = reinterpret_cast<const uint8_t*>(&s.entries[i]);
    uint8_t* table = blob + sizeof(BlobHeader) + uint64_t(i) * sizeof(ChunkEntry);
    for (uint32_t k = 0; k < sizeof(ChunkEntry); ++k) table[k] = ep[k];
  }
}

// Restore, per chunk: check the crc, copy raw chunks, and point LZ4 chunks at nvCOMP (raw chunks get a
// one-byte empty LZ4 block so the batch stays dense).
__device__ const uint8_t kEmptyBlock[1] = {0};

__global__ void unpack_chunks(const uint8_t* blob, uint64_t nbytes, uint32_t chunk_bytes, uint32_t n, Scratch s,
                              uint8_t* dst, int* bad) {
  const uint32_t i = blockIdx.x;
  const ChunkEntry* entries = reinterpret_cast<const ChunkEntry*>(blob + sizeof(BlobHeader));
  __shared__ uint64_t at;
  if (threadIdx.x == 0) {  // offsets again: each block scans the table (n is small)
    at = table_bytes(n);
    for (uint32_t k = 0; k < i; ++k) at += payload_len(entries[k].stored);
  }
  __syncthreads();
  const uint32_t len = payload_len(entries[i].stored);
  const bool raw = entries[i].stored & kRawFlag;
  if (threadIdx.x == 0) {
    if (crc32c_update(0, blob + at, len) != entries[i].crc) atomicCAS(bad, -1, int(i));
    s.in[i] = raw ? static_cast<const void*>(kEmptyBlock) : blob + at;
    s.in_bytes[i] = raw ? 1 : len;
    s.out[i] = dst + uint64_t(i) * chunk_bytes;
    s.out_bytes[i] = chunk_len(i, nbytes, chunk_bytes);
  }
  if (raw) {
    ChunkDesc d{at, uint64_t(i) * chunk_bytes, len, true};
    for (uint64_t k = threadIdx.x; k < d.len; k += blockDim.x) dst[d.dst + k] = blob[d.src + k];
  }
}

__global__ void check_status(const uint8_t* blob, Scratch s, uint32_t n, int* bad) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const ChunkEntry* entries = reinterpret_cast<const ChunkEntry*>(blob + sizeof(BlobHeader));
  if (!(entries[i].stored & kRawFlag) && s.status[i] != nvcompSuccess) atomicCAS(bad, -1, int(i));
}

}  // namespace

size_t cuda_compress_scratch_bytes(uint64_t nbytes, uint32_t width, uint32_t chunk_bytes) {
  Scratch s;
  return layout(&s, nullptr, n_chunks_for(nbytes, chunk_bytes), width, chunk_bytes, nbytes);
}

uint64_t cuda_blob_bound(uint64_t nbytes, uint32_t chunk_bytes) {
  const uint32_t n = n_chunks_for(nbytes, chunk_bytes);
  return table_bytes(n) + nbytes;  // raw fallback bounds every chunk by its own length
}

int cuda_compress(const void* d_src, uint64_t nbytes, uint32_t width, uint32_t chunk_bytes, void* d_scratch,
                  size_t scratch_bytes, void* d_blob, uint64_t* d_blob_bytes, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const uint32_t n = n_chunks_for(nbytes, chunk_bytes);
  Scratch s;
  if (layout(&s, static_cast<uint8_t*>(d_scratch), n, width, chunk_bytes, nbytes) > scratch_bytes) return -1;
  const uint8_t* src = static_cast<const uint8_t*>(d_src);
  uint8_t* blob = static_cast<uint8_t*>(d_blob);
  if (n) {
    fill_ptrs<<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(src, nbytes, chunk_bytes, n, s);
    const nvcompStatus_t st = nvcompBatchedLZ4CompressAsync(s.in, s.in_bytes, chunk_bytes, n, s.temp, s.temp_bytes,
                                                            s.out, s.out_bytes, comp_opts(width), s.status, stream);
    if (st != nvcompSuccess) return int(st);
  }
  plan<<<1, 1, 0, stream>>>(s, n, nbytes, width, chunk_bytes, blob, d_blob_bytes);
  if (n) compact<<<n, kThreads, 0, stream>>>(s, src, chunk_bytes, blob);
  return int(cudaGetLastError());
}

int cuda_decompress(const void* d_blob, uint64_t blob_bytes, uint32_t n, void* d_dst, uint64_t nbytes,
                    uint32_t width, uint32_t chunk_bytes, void* d_scratch, size_t scratch_bytes, int* d_bad_chunk,
                    void* stream_ptr) {
  (void)blob_bytes;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  Scratch s;
  if (layout(&s, static_cast<uint8_t*>(d_scratch), n, width, chunk_bytes, nbytes) > scratch_bytes) return -1;
  const uint8_t* blob = static_cast<const uint8_t*>(d_blob);
  cudaMemsetAsync(d_bad_chunk, 0xff, sizeof(int), stream);
  if (!n) return int(cudaGetLastError());
  unpack_chunks<<<n, kThreads, 0, stream>>>(blob, nbytes, chunk_bytes, n, s, static_cast<uint8_t*>(d_dst), d_bad_chunk);
  nvcompBatchedLZ4DecompressOpts_t o = nvcompBatchedLZ4DecompressDefaultOpts;
  o.data_type = type_of(width);
  o.bitshuffle_mode = width > 1 ? NVCOMP_BITSHUFFLE_LSB_FIRST : NVCOMP_BITSHUFFLE_NONE;
  // offsets are free during restore: they receive nvCOMP's actual output sizes
  const nvcompStatus_t st = nvcompBatchedLZ4DecompressAsync(s.in, s.in_bytes, s.out_bytes,
                                                            reinterpret_cast<size_t*>(s.offsets), n, s.temp,
                                                            s.temp_bytes, s.out, o, s.status, stream);
  if (st != nvcompSuccess) return int(st);
  check_status<<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(blob, s, n, d_bad_chunk);
  return int(cudaGetLastError());
}

}  // namespace forge_paging
