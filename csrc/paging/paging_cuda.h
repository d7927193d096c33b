// GPU side of the paging codec (csrc/paging/paging_cuda.cu): nvCOMP's batched LZ4 on a caller's
// stream, then a compaction kernel that packs the chunk payloads into one blob (blob_hd.h layout,
// kFlagGpu) with device-side offsets, so forward never waits on the host. Plain C++ interface: the
// bind file calls it only under FORGE_RT_HAS_CUDA.
#pragma once
#include <cstddef>
#include <cstdint>

namespace forge_paging {

// Device scratch needed to compress nbytes (chunk pointer arrays, nvCOMP temp, output slots).
size_t cuda_compress_scratch_bytes(uint64_t nbytes, uint32_t width, uint32_t chunk_bytes);
// Upper bound of the blob size (allocate the pool entry with it; the real size lands in *d_blob_bytes).
uint64_t cuda_blob_bound(uint64_t nbytes, uint32_t chunk_bytes);
// Enqueues compression of d_src on `stream` (a cudaStream_t); returns 0 or a cudaError/nvcompStatus code.
int cuda_compress(const void* d_src, uint64_t nbytes, uint32_t width, uint32_t chunk_bytes, void* d_scratch,
                  size_t scratch_bytes, void* d_blob, uint64_t* d_blob_bytes, void* stream);
// Enqueues the inverse; *d_bad_chunk gets -1, or the first chunk whose crc32 or LZ4 status failed.
int cuda_decompress(const void* d_blob, uint64_t blob_bytes, uint32_t n_chunks, void* d_dst, uint64_t nbytes,
                    uint32_t width, uint32_t chunk_bytes, void* d_scratch, size_t scratch_bytes, int* d_bad_chunk,
                    void* stream);

}  // namespace forge_paging
