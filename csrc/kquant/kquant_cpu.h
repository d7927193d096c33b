// GGML block quantizers on the CPU (see kquant_hd.h for the per-block work).
#pragma once
#include <cstdint>

namespace forge_kq {

int64_t block_values(int type);  // values per block of a GGML type id; 0 when this build cannot write it
int64_t block_bytes(int type);
// nrows rows of n_per_row floats (a multiple of block_values) into ggml's bytes; imatrix: n_per_row
// importance weights per column, or null. Same bytes as ggml_quantize_chunk(type, src, dst, 0, ...).
void quantize_rows(int type, const float* src, int64_t nrows, int64_t n_per_row, const float* imatrix,
                   uint8_t* dst);

}  // namespace forge_kq
